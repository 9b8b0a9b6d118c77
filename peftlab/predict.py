"""``peftlab predict``: run a trained model on raw text.

``predict(path, texts)`` accepts three kinds of folder:

* a run folder (``recipe.yaml`` + ``model/``): base backbone + the method's saved weights, via
  :func:`peftlab.runs.load_run` (quantized if the run was);
* an exported package (``peftlab export``): the same layout, so the same loader;
* a merged checkpoint (``peftlab merge``, or any plain ``transformers`` *For<Task> folder).

What comes out depends on the task (one dict per input text, in input order):

* ``token_classification``: ``{"text", "entities": [{"text", "type", "start", "end", "score"}]}``.
  Raw text is split into words with character offsets (:func:`split_words`), the words are
  tokenized as in training (``is_split_into_words``), each word takes the prediction of its first
  sub-token, and IOB2 tags are turned into entity spans exactly as the evaluator (seqeval) reads
  them. ``score`` is the mean probability of the predicted tags over the entity's words; ``start``/
  ``end`` are character offsets into the text (``text[start:end] == entity text``).
* ``sequence_classification``: ``{"text", "label", "probability"}`` (plus ``top`` with ``top_k > 1``).
* ``causal_lm``: ``{"text", "completion"}`` (greedy, the task's own ``generate``; the recipe's
  prompt template applies when the folder carries the recipe).
* ``question_answering``: ``{"question", "answer", "start", "end", "score"}`` (``start``/``end``: the
  answer's characters in the context), from the task's own ``predict_plans``.

Tasks whose prediction is forward passes plus decoding give :class:`~peftlab.tasks.Plan` s (registered
with :func:`register_planner`, or the task's own ``predict_plans``): :func:`run_plans` runs them on
one model, and ``peftlab.mixed`` runs several LoRA adapters' plans in shared forward passes. Others
(generation) register ``fn(predictor, texts, batch_size, advance)`` with :func:`register_predictor`.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch

from .errors import PeftlabError
from .tasks import Plan
from .util import default_device, is_bnb_model

PathLike = Union[str, Path]

# URLs, @mentions and #hashtags stay whole (as in tweet-tokenized NER data such as WNUT-17); words
# keep inner apostrophes and hyphens; every other non-space character is a word of its own.
WORD_PATTERN = re.compile(
    r"(?:https?://|www\.)\S+"
    r"|[@#]\w+"
    r"|\w+(?:['’\-]\w+)*"
    r"|[^\w\s]",
    re.UNICODE,
)


@dataclass
class Predictor:
    """A loaded model ready for :func:`predict` (load once, predict many times)."""

    task: str
    model: Any
    tokenizer: Any
    labels: list[str]
    source: str  # "run" | "export" | "merged"
    path: Path
    device: torch.device
    max_length: int = 512
    extra: dict = field(default_factory=dict)  # task-specific (e.g. the recipe of a run)


PredictFn = Callable[[Predictor, list[str], int, Optional[Callable[[int], None]]], list[dict]]
PlanFn = Callable[[Predictor, list, int, int], Iterable[Plan]]
_PREDICTORS: dict[str, PredictFn] = {}
_PLANNERS: dict[str, PlanFn] = {}  # tasks whose predictions are forward passes (see Plan): mixable


def register_predictor(task: str) -> Callable[[PredictFn], PredictFn]:
    """``@register_predictor("causal_lm")`` on ``fn(predictor, texts, batch_size, advance) -> rows``."""

    def deco(fn: PredictFn) -> PredictFn:
        _PREDICTORS[task] = fn
        return fn

    return deco


def register_planner(task: str) -> Callable[[PlanFn], PlanFn]:
    """``@register_planner(task)`` on ``fn(predictor, inputs, batch_size, top_k) -> plans``."""

    def deco(fn: PlanFn) -> PlanFn:
        _PLANNERS[task] = fn
        return fn

    return deco


# ------------------------------------------------------------------------------------- loading


def _max_length(model: Any, tokenizer: Any) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else 512


def task_of_config(config: Any, where: Path) -> str:
    """The registered task whose head architecture the checkpoint's config names."""
    from .tasks import available_tasks, get_task_class

    suffixes = {get_task_class(t).architecture(): t for t in available_tasks()}
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in suffixes.items():
            if arch.endswith(suffix):
                return task
    expected = ", ".join(f"*{s}" for s in suffixes)
    raise PeftlabError(
        f"{where / 'config.json'}: architectures: expected one of {expected}, "
        f"found {getattr(config, 'architectures', None)}"
    )


def load_predictor(path: PathLike, device: Optional[torch.device] = None) -> Predictor:
    """Load a run folder, an exported package or a merged checkpoint (see the module docstring)."""
    from .runs import MODEL_DIR

    path = Path(path)
    device = device or default_device()
    if not path.is_dir():
        raise PeftlabError(f"{path}: no such folder (expected a run folder, an export or a merged checkpoint)")
    if (path / "recipe.yaml").is_file() and (path / MODEL_DIR).is_dir():
        from .deploy.export import EXPORT_FILE
        from .runs import load_run

        run = load_run(path, device=device)
        if not is_bnb_model(run.model):
            run.model.to(device)
        run.model.eval()
        source = "export" if (path / EXPORT_FILE).is_file() else "run"
        return Predictor(run.task.name, run.model, run.tokenizer, list(run.task.labels), source, path, device,
                         _max_length(run.model, run.tokenizer), {"recipe": run.recipe, "task": run.task})
    if (path / "config.json").is_file():
        from transformers import AutoConfig, AutoTokenizer

        from .backbones import auto_class, safetensors_problem
        from .tasks import get_task_class


        for weights in sorted(path.glob("*.safetensors")):
            if safetensors_problem(weights):
                raise PeftlabError(f"{weights}: not a complete safetensors file ({safetensors_problem(weights)})")
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PeftlabError(f"{path / 'config.json'}: cannot read it: {first[:200]}") from None
        task = task_of_config(config, path)
        task_cls = get_task_class(task)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = auto_class(task_cls.auto_model).from_pretrained(str(path), dtype="auto", use_safetensors=True)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PeftlabError(f"{path}: cannot load the checkpoint: {first[:200]}") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        extra = _merged_task(path, task)
        id2label = getattr(config, "id2label", None) or {}
        labels = [id2label[i] for i in range(len(id2label))] if task_cls.has_labels else []
        if extra.get("task") is not None:  # a head transformers lacks (a CRF) is the task's to install
            extra["task"].set_labels(labels)
            model = extra["task"].prepare_model(model, str(path))
        model.to(device)
        model.eval()
        return Predictor(task, model, tokenizer, labels, "merged", path, device, _max_length(model, tokenizer), extra)
    raise PeftlabError(
        f"{path}: not a run folder, an exported package or a merged checkpoint "
        f"(expected recipe.yaml + model/, or config.json)"
    )


def _merged_task(path: Path, task: str) -> dict:
    """The peftlab task object of a merged checkpoint, rebuilt from its peftlab_merge.json (if any)."""
    from .deploy.merge import MERGE_FILE
    from .recipe import recipe_from_dict
    from .tasks import get_task_class

    info_path = path / MERGE_FILE
    if not info_path.is_file():
        return {}
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        recipe = recipe_from_dict(info["recipe"], source=str(info_path))
    except (ValueError, KeyError, TypeError, PeftlabError):
        return {}  # a plain checkpoint is enough for token and sequence classification
    if recipe.task != task:
        return {}
    return {"recipe": recipe, "task": get_task_class(task)(recipe)}


# ------------------------------------------------------------------------------------- predict


def predict(
    model: Union[PathLike, Predictor],
    texts: Union[str, Iterable[str]],
    *,
    batch_size: int = 32,
    progress: bool = False,
    device: Optional[torch.device] = None,
) -> list[dict]:
    """Predictions for ``texts`` (one dict per text, in order) from a folder or a loaded Predictor."""
    predictor = model if isinstance(model, Predictor) else load_predictor(model, device=device)
    texts = [texts] if isinstance(texts, (str, dict)) else list(texts)
    if batch_size < 1:
        raise PeftlabError("--batch-size: expected a positive number")
    planner = plans_of(predictor)
    if planner is None and predictor.task not in _PREDICTORS:
        raise PeftlabError(
            f"{predictor.path}: predict does not support task '{predictor.task}' yet "
            f"(supported: {', '.join(sorted({*_PREDICTORS, *_PLANNERS}))})"
        )
    if predictor.task in (_PLANNERS.keys() | _PREDICTORS.keys()) and any(isinstance(t, dict) for t in texts):
        raise PeftlabError(f"{predictor.path}: task {predictor.task} predicts texts, not question/context pairs")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="predict", unit="text", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    advance = bar.update if bar is not None else None
    try:
        if planner is not None:
            return run_plans(predictor, planner(texts, batch_size), len(texts), advance)
        return _PREDICTORS[predictor.task](predictor, texts, batch_size, advance)
    finally:
        if bar is not None:
            bar.close()


@torch.no_grad()
def run_plans(p: Predictor, plans: Iterable[Plan], n: int, advance: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Rows for ``n`` inputs from their plans, each batch a forward pass of the predictor's own model."""
    results: list[Optional[dict]] = [None] * n
    for plan in plans:
        for j, batch in enumerate(plan.batches):
            plan.take(j, forward(p, batch))
        plan.place(results)
        if advance is not None:
            advance(len(plan.indices))
    return results  # type: ignore[return-value]


@torch.no_grad()
def forward(p: Predictor, batch: dict) -> Any:
    """The predictor's own model on one batch of a plan (moved to its device)."""
    return p.model(**{k: v.to(p.device) for k, v in batch.items()})


def plans_of(p: Predictor, top_k: int = 1) -> Optional[Callable[[list, int], Iterable[Plan]]]:
    """``fn(inputs, batch_size) -> plans`` for the predictor's task, if it predicts through plans."""
    if p.task in _PLANNERS:
        return lambda inputs, size: _PLANNERS[p.task](p, inputs, size, top_k)
    if p.task in _PREDICTORS:
        return None
    task = _task_of(p)
    if not hasattr(task, "predict_plans"):
        return None
    return lambda inputs, size: task.predict_plans(p.tokenizer, inputs, size)


def _batches(n: int, size: int, lengths: list[int]) -> Iterator[list[int]]:
    """Indices in batches of similar length (less padding); results are put back in input order."""
    order = sorted(range(n), key=lambda i: -lengths[i])
    for start in range(0, n, size):
        yield order[start : start + size]


# ------------------------------------------------------------------------------------------ NER


def split_words(text: str) -> list[tuple[str, int, int]]:
    """``(word, start, end)`` character spans of the words of ``text`` (see ``WORD_PATTERN``)."""
    return [(m.group(), m.start(), m.end()) for m in WORD_PATTERN.finditer(text)]


def _is_iob(labels: list[str]) -> bool:
    return all(label == "O" or label[:2] in ("B-", "I-", "E-", "S-") for label in labels)


def tag_spans(tags: list[str], iob: bool = True) -> list[tuple[str, int, int]]:
    """``(type, first word, last word)`` of each entity, read as seqeval reads IOB2 (default mode)."""
    if iob:
        from .metrics import get_entities

        return get_entities(list(tags))
    spans: list[tuple[str, int, int]] = []  # plain tags (PER, LOC): runs of the same tag
    for i, tag in enumerate(tags):
        if tag == "O":
            continue
        if spans and spans[-1][0] == tag and spans[-1][2] == i - 1:
            spans[-1] = (tag, spans[-1][1], i)
        else:
            spans.append((tag, i, i))
    return spans


@register_planner("token_classification")
def plan_entities(p: Predictor, texts: list[str], batch_size: int, top_k: int = 1) -> Iterator[Plan]:
    """One plan per batch of texts of similar length (texts without a word need no forward)."""
    words = [split_words(t) for t in texts]
    for idx in _batches(len(texts), batch_size, [len(w) for w in words]):
        todo = [i for i in idx if words[i]]
        enc = p.tokenizer([[w for w, _, _ in words[i]] for i in todo], is_split_into_words=True, truncation=True,
                          max_length=p.max_length, padding=True, return_tensors="pt") if todo else None
        yield _entity_plan(p, texts, words, idx, todo, enc)


def _entity_plan(p: Predictor, texts: list[str], words: list, idx: list[int], todo: list[int], enc: Any) -> Plan:
    found: dict[str, torch.Tensor] = {}
    iob = _is_iob(p.labels)

    def take(j: int, out: Any) -> None:
        found["p"], found["id"] = _tags_and_scores(p, out.logits.float(), enc)

    def finish() -> list[dict]:
        rows = {i: {"text": texts[i], "entities": []} for i in idx if not words[i]}
        for row, i in enumerate(todo):
            rows[i] = _entities(p, texts[i], words[i], enc.word_ids(row), found["p"][row], found["id"][row], iob)
        return [rows[i] for i in idx]

    return Plan(list(idx), [dict(enc)] if todo else [], take, finish)


def _entities(p: Predictor, text: str, words: list, word_ids: list, best_p: torch.Tensor, best_id: torch.Tensor,
              iob: bool) -> dict:
    """The text's entities from the tag of each word's first sub-token (words cut off by truncation: O)."""
    tags, scores = ["O"] * len(words), [0.0] * len(words)
    seen = set()
    for pos, w in enumerate(word_ids):
        if w is None or w in seen:
            continue  # special tokens and later sub-tokens
        seen.add(w)
        tags[w] = p.labels[int(best_id[pos])]
        scores[w] = float(best_p[pos])
    entities = []
    for kind, s, e in tag_spans(tags, iob):
        start, end = words[s][1], words[e][2]
        entities.append({"text": text[start:end], "type": kind, "start": start, "end": end,
                         "score": round(sum(scores[s : e + 1]) / (e - s + 1), 6)})
    result = {"text": text, "entities": entities}
    if len(seen) < len(words):
        result["words_not_seen"] = len(words) - len(seen)  # truncated (tagged O)
    return result


def _tags_and_scores(p: Predictor, logits: torch.Tensor, enc: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: the predicted tag id and its probability. A CRF head (``task_options.head: crf``)
    decodes each sentence's first sub-tokens with Viterbi; the score is the emission probability."""
    probs = logits.softmax(-1).cpu()
    task = p.extra.get("task")
    if task is None or not getattr(task, "crf", False):
        best_p, best_id = probs.max(-1)
        return best_p, best_id
    from .tasks.crf import CRFClassifier

    first = torch.full(logits.shape[:2], -100, dtype=torch.long)
    for row in range(logits.shape[0]):
        seen: set = set()
        for pos, w in enumerate(enc.word_ids(row)):
            if w is not None and w not in seen:
                first[row, pos] = 0
                seen.add(w)
    best_id = task.decode(CRFClassifier.used(), logits, first.to(logits.device)).clamp(min=0).cpu()
    return probs.gather(-1, best_id[..., None]).squeeze(-1), best_id


# ------------------------------------------------------------------------------- classification


@register_planner("sequence_classification")
def plan_labels(p: Predictor, texts: list[str], batch_size: int, top_k: int = 1) -> Iterator[Plan]:
    problem = getattr(p.model.config, "problem_type", None)
    threshold = _dev_threshold(p.path) if problem == "multi_label_classification" else None
    for idx in _batches(len(texts), batch_size, [len(t) for t in texts]):
        enc = p.tokenizer([texts[i] for i in idx], truncation=True, max_length=p.max_length, padding=True,
                          return_tensors="pt")
        yield _label_plan(p, texts, idx, dict(enc), problem, threshold, top_k)


def _label_plan(p: Predictor, texts: list[str], idx: list[int], inputs: dict, problem: Optional[str],
                threshold: Optional[float], top_k: int) -> Plan:
    found: list[torch.Tensor] = []

    def finish() -> list[dict]:
        if problem in ("multi_label_classification", "regression"):
            return [_multi_or_score(p, texts[i], found[0][row], threshold) for row, i in enumerate(idx)]
        return [_single_label(p, texts[i], found[0][row].softmax(-1), top_k) for row, i in enumerate(idx)]

    return Plan(list(idx), [inputs], lambda j, out: found.append(out.logits.float().cpu()), finish)


def predict_labels(p: Predictor, texts: list[str], batch_size: int, advance: Optional[Callable[[int], None]],
                   top_k: int = 1) -> list[dict]:
    """Sequence classification rows, the ``top_k`` labels of each (``peftlab predict --top-k``)."""
    return run_plans(p, plan_labels(p, texts, batch_size, top_k), len(texts), advance)


def _single_label(p: Predictor, text: str, probs: torch.Tensor, top_k: int) -> dict:
    best = int(probs.argmax())
    result = {"text": text, "label": p.labels[best], "probability": round(float(probs[best]), 6)}
    if top_k > 1:
        values, ids = probs.topk(min(top_k, probs.shape[-1]))
        result["top"] = [{"label": p.labels[int(j)], "probability": round(float(v), 6)} for v, j in zip(values, ids)]
    return result


def _multi_or_score(p: Predictor, text: str, logits: torch.Tensor, threshold: Optional[float]) -> dict:
    """A regression head's score (``threshold`` None), or every label at or above ``threshold``
    (the run's validation threshold, multi-label)."""
    if threshold is None:
        return {"text": text, "score": round(float(logits[0]), 6)}
    probs = logits.sigmoid().tolist()
    return {"text": text, "labels": [p.labels[j] for j, v in enumerate(probs) if v >= threshold],
            "threshold": threshold, "probabilities": {p.labels[j]: round(v, 6) for j, v in enumerate(probs)}}


def _dev_threshold(path: Path) -> float:
    """The multi-label decision threshold chosen on validation: a run's or an export's metrics.json,
    or the threshold a merged checkpoint carries in peftlab_merge.json; 0.5 without one."""
    from .deploy.merge import MERGE_FILE
    from .util import read_json_or_none

    def as_dict(value: Any) -> dict:
        return value if isinstance(value, dict) else {}

    dev = as_dict(as_dict(read_json_or_none(path / "metrics.json")).get("dev"))
    for value in (dev.get("threshold"), as_dict(read_json_or_none(path / MERGE_FILE)).get("threshold")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.5


# -------------------------------------------------------------------------------------- causal_lm


@register_predictor("causal_lm")
def predict_completions(p: Predictor, texts: list[str], batch_size: int,
                        advance: Optional[Callable[[int], None]]) -> list[dict]:
    """Prompt in, greedy completion out (the causal_lm task's own ``generate``).

    With a run, an export or a merged checkpoint that has peftlab_merge.json, each text fills the
    recipe's prompt template (and chat template) as in training; a bare causal LM checkpoint takes
    each text as the finished prompt.
    """
    templated = p.extra.get("task") is not None
    task = _task_of(p)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        completions = task.generate(p.model, p.tokenizer, chunk, batch_size=batch_size, templated=templated)
        out += [{"text": t, "completion": c} for t, c in zip(chunk, completions)]
        if advance is not None:
            advance(len(chunk))
    return out


def _task_of(p: Predictor) -> Any:
    """The task object of the folder (a run's, or a merged checkpoint's peftlab_merge.json), else the
    task's defaults for a bare checkpoint (inputs up to its own length limit)."""
    if p.extra.get("task") is not None:
        return p.extra["task"]
    from .recipe import recipe_from_dict
    from .tasks import get_task_class

    cls = get_task_class(p.task)
    data = {"train": "-", **({"max_length": min(384, p.max_length)} if hasattr(cls, "predict_plans") else {})}
    recipe = recipe_from_dict({"backbone": {"name": str(p.path)}, "task": p.task, "method": {"name": "full"},
                               "data": data}, source=str(p.path))
    return cls(recipe)
