"""Scores computed in peftlab: entity-level precision/recall/F1 as seqeval's default mode computes
them, macro-F1 and multi-label F1 as scikit-learn's ``f1_score``, Pearson and Spearman as SciPy's.
SQuAD v1.1 exact match and token F1 as its official evaluation script computes them.

Both libraries import scikit-learn, SciPy and pandas, about 150 MiB resident in every training process
that evaluates; these few lines do the same arithmetic (tests/test_metrics.py checks them against
seqeval, scikit-learn and SciPy on random inputs, IOBES and malformed tags included).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable, Sequence


def _split(tag: str) -> tuple[str, str]:
    """(prefix letter, entity type) as seqeval reads a tag: ``B-PER`` -> (B, PER), ``O`` -> (O, _)."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    return prev in ("E", "S") or (prev in ("B", "I") and tag in ("B", "S", "O")) or (
        prev not in ("O", ".") and prev_type != type_)


def _starts(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    return tag in ("B", "S") or (prev in ("E", "S", "O") and tag in ("E", "I")) or (
        tag not in ("O", ".") and prev_type != type_)


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(type, first, last)`` of each entity in one tag sequence (IOB1/IOB2/IOBES, seqeval's default
    reading: an ``I-`` after ``O`` or after another type starts an entity)."""
    prev, prev_type, begin, out = "O", "", 0, []
    for i, tag in enumerate([*tags, "O"]):
        letter, type_ = _split(tag)
        if _ends(prev, letter, prev_type, type_):
            out.append((prev_type, begin, i - 1))
        if _starts(prev, letter, prev_type, type_):
            begin = i
        prev, prev_type = letter, type_
    return out


def _entities(seqs: Iterable[Sequence[str]]) -> set[tuple[str, int, int]]:
    """Entities of every sentence, positions offset as if the sentences were joined by ``O``."""
    found, offset = set(), 0
    for seq in seqs:
        found.update((t, s + offset, e + offset) for t, s, e in get_entities(seq))
        offset += len(seq) + 1
    return found


def _prf(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def entity_scores(y_true: list[list[str]], y_pred: list[list[str]]) -> dict:
    """Micro precision/recall/F1 over entities, and per type (with support = gold entities of the
    type); a score with a zero denominator is 0."""
    gold, pred = _entities(y_true), _entities(y_pred)
    hits = gold & pred
    p, r, f = _prf(len(hits), len(pred), len(gold))
    n_gold, n_pred, n_hit = (Counter(t for t, _, _ in s) for s in (gold, pred, hits))
    per_type = {}
    for t in sorted(set(n_gold) | set(n_pred)):
        tp, tr, tf = _prf(n_hit[t], n_pred[t], n_gold[t])
        per_type[t] = {"precision": tp, "recall": tr, "f1": tf, "support": n_gold[t]}
    return {"precision": p, "recall": r, "f1": f, "per_type": per_type}


def macro_f1(gold: Sequence, pred: Sequence) -> float:
    """Unweighted mean of each label's F1 over the labels in ``gold`` or ``pred``."""
    labels = set(gold) | set(pred)
    if not labels:
        return 0.0
    tp = Counter(g for g, p in zip(gold, pred) if g == p)
    n_gold, n_pred = Counter(gold), Counter(pred)
    return sum(_prf(tp[x], n_pred[x], n_gold[x])[2] for x in labels) / len(labels)


def multilabel_f1(gold: Sequence[Sequence[int]], pred: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(micro-F1, macro-F1) of multi-hot rows; macro over every label (one absent from both is 0)."""
    n = len(gold[0]) if len(gold) else 0
    tp, n_gold, n_pred = [0] * n, [0] * n, [0] * n
    for g_row, p_row in zip(gold, pred):
        for j, (g, p) in enumerate(zip(g_row, p_row)):
            tp[j] += g and p
            n_gold[j] += g
            n_pred[j] += p
    micro = _prf(sum(tp), sum(n_pred), sum(n_gold))[2]
    macro = sum(_prf(tp[j], n_pred[j], n_gold[j])[2] for j in range(n)) / n if n else 0.0
    return micro, macro


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; NaN when either side is constant or has fewer than two values."""
    n = len(x)
    if n < 2:
        return math.nan
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    return pearson(_ranks(x), _ranks(y))


# SQuAD v1.1's official evaluation script (evaluate-v1.1.py), the same arithmetic.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Exact match and token F1 in percent, each the max over a question's reference answers."""
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = sum(max(float(normalize_answer(p) == normalize_answer(r)) for r in refs)
             for p, refs in zip(predictions, references))
    f1 = sum(max(answer_f1(p, r) for r in refs) for p, refs in zip(predictions, references))
    return {"exact_match": 100.0 * em / len(predictions), "f1": 100.0 * f1 / len(predictions)}
