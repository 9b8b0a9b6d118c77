"""Named-entity recognition / token tagging, scored at entity level as seqeval scores it (peftlab.metrics).

Labels are aligned to the first sub-token of each word (the rest get -100). Scoring is against
every gold word: a word that got no sub-token (an emoji the tokenizer drops, a truncated tail) is
predicted ``O``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from transformers import DataCollatorForTokenClassification

from ..data import check_token_rows, load_splits
from ..metrics import entity_scores
from . import EncodedSplit, LossTally, NoOptions, Task, batch_to_model_inputs, check_known_labels, register_task
from .crf import CRFClassifier, compact, iob2_allowed, load_crf_tensors, repair_iob2


class TaggingOptions(NoOptions):
    head: Literal["softmax", "crf"] = Field(
        "softmax", description="softmax: each first sub-token classified alone; crf: a linear-chain CRF over "
        "the sentence's first sub-tokens (learned tag transitions, Viterbi decoding; predicted by peftlab: a "
        "merged checkpoint holds the emission layer that plain transformers uses, and the transitions).")
    crf_iob2_constraints: bool = Field(
        True, description="head crf with IOB2 tags: transitions IOB2 forbids (I-X not after B-X/I-X) are never "
        "decoded; such tags in the training data are read as B-X, as seqeval reads them.")


def sort_tags(tags: set[str]) -> list[str]:
    """``O`` first, then by entity type with B- before I-."""

    def key(tag: str):
        if tag == "O":
            return (0, "", "")
        prefix, _, kind = tag.partition("-")
        return (1, kind or prefix, prefix)

    return sorted(tags, key=key)


@register_task
class TokenClassification(Task):
    name = "token_classification"
    description = "NER / token tagging (CoNLL or JSONL token lists); entity-level seqeval F1"
    auto_model = "AutoModelForTokenClassification"
    metrics = ("f1", "precision", "recall", "accuracy", "loss")
    default_metric = "f1"
    peft_task_type = "TOKEN_CLS"
    pipeline_tag = "token-classification"
    Options = TaggingOptions

    @classmethod
    def usage_code(cls, name: str) -> list[str]:
        return ["from transformers import pipeline", "",
                f'ner = pipeline("token-classification", model="{name}", aggregation_strategy="simple")',
                'print(ner("Heading to the Eiffel Tower with Emma tomorrow"))']

    @property
    def columns(self) -> list[str]:
        return [self.data_cfg.tokens_column, self.data_cfg.tags_column]

    def column_keys(self) -> dict[str, str]:
        return {self.data_cfg.tokens_column: "data.tokens_column", self.data_cfg.tags_column: "data.tags_column"}

    def load_splits(self):
        splits = load_splits(self.data_cfg, self.columns, kind="tokens", named_by=self.column_keys())
        tags_col = self.data_cfg.tags_column
        check_token_rows(splits.rows(), *self.columns)
        self.set_labels(sort_tags({t for ex in splits.train for t in ex[tags_col]}))
        known = set(self.labels)
        check_known_labels(splits.validation, tags_col, known, "validation", is_list=True)
        if splits.test is not None:
            check_known_labels(splits.test, tags_col, known, "test", is_list=True)
        return splits

    def encode(self, examples: list[dict], tokenizer: Any, split: str) -> EncodedSplit:
        tok_col, tag_col = self.columns
        enc = tokenizer(
            [ex[tok_col] for ex in examples],
            is_split_into_words=True,
            truncation=True,
            max_length=self.data_cfg.max_length,
        )
        l2i = self.label2id
        repair = self._constrained()  # a CRF under IOB2 constraints learns repaired tags
        features, kept_words = [], []
        for i, ex in enumerate(examples):
            tags = repair_known(ex[tag_col], l2i) if repair else ex[tag_col]
            word_ids = enc.word_ids(i)
            labels, kept, previous = [], [], None
            for w in word_ids:
                if w is None or w == previous:
                    labels.append(-100)
                else:
                    labels.append(l2i[tags[w]])
                    kept.append(w)
                previous = w
            feat = {k: enc[k][i] for k in enc.keys()}
            feat["labels"] = labels
            features.append(feat)
            kept_words.append(kept)
        return EncodedSplit(features, examples, {"kept_words": kept_words})

    def collator(self, tokenizer: Any):
        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=None)

    # -- the CRF head -----------------------------------------------------------------------------
    @property
    def crf(self) -> bool:
        return self.options.head == "crf"

    def _constrained(self) -> bool:
        return self.crf and self.options.crf_iob2_constraints and all(
            t == "O" or t[:2] in ("B-", "I-") for t in self.labels)

    def card_notes(self) -> list[str]:
        if not self.crf:
            return []
        return ["**CRF head.** This model was trained with a CRF over its tags (peftlab `task_options.head: crf`). "
                "transformers has no CRF layer: it loads the `classifier` as a softmax tagger (and reports the "
                "transition tensors as unused). `peftlab predict` on this folder decodes with the CRF, as the "
                "run's metrics were measured.", ""]

    def prepare_model(self, model: Any, path: Optional[str] = None) -> Any:
        if not self.crf:
            return model
        allowed = iob2_allowed(self.labels) if self._constrained() else None
        model.classifier = CRFClassifier.from_linear(model.classifier, allowed)
        if path is not None:
            load_crf_tensors(model.classifier, Path(path))
        return model

    def count_items(self, batch: dict) -> int:
        if self.crf:  # one negative log-likelihood per sentence
            return int(((batch["labels"] != -100).sum(1) > 0).sum())
        return super().count_items(batch)

    def loss_sum(self, model: Any, batch: dict) -> torch.Tensor:
        if not self.crf:
            return super().loss_sum(model, batch)
        return crf_nll(*self._emissions(model, batch), batch["labels"]).sum()

    def _emissions(self, model: Any, batch: dict) -> tuple[Optional[CRFClassifier], torch.Tensor]:
        """The CRF head the forward pass used (None without one), and its logits (B, L, tags)."""
        logits = model(**{k: v for k, v in batch_to_model_inputs(batch).items() if k != "labels"}).logits
        return (CRFClassifier.used() if self.crf else None), logits

    @torch.no_grad()
    def predict_ids(self, model: Any, dataloader: Any, accelerator: Any) -> tuple[list[list[int]], float]:
        """Label ids at every labelled (first sub-token) position, per example, in order; the mean loss."""
        model.eval()
        out: list[list[int]] = []
        tally = LossTally()
        for batch in dataloader:
            crf, emissions = self._emissions(model, batch)
            labels = batch["labels"]
            labelled = labels != -100
            if self.crf:  # one negative log-likelihood per labelled sentence
                row_loss = torch.zeros(len(labels), device=emissions.device)
                row_loss[labelled.any(1)] = crf_nll(crf, emissions, labels)
                row_items, pred = labelled.any(1), self.decode(crf, emissions, labels)
            else:  # the model's own loss (cross-entropy over labelled tokens), summed per sentence
                row_loss = F.cross_entropy(emissions.float().transpose(1, 2), labels, ignore_index=-100,
                                           reduction="none").sum(1)
                row_items, pred = labelled.sum(1), emissions.argmax(-1)
            pred = accelerator.pad_across_processes(pred, dim=1, pad_index=-100)
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
            pred, labels, row_loss, row_items = accelerator.gather_for_metrics((pred, labels, row_loss, row_items))
            tally.add(row_loss, row_items)
            for p, lab in zip(pred.tolist(), labels.tolist()):
                out.append([pi for pi, li in zip(p, lab) if li != -100])
        return out, tally.mean()

    @staticmethod
    def decode(crf: CRFClassifier, emissions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Viterbi tags at the labelled positions (``labels != -100``), the rest -100: (B, L) ids."""
        keep = labels != -100
        compacted, mask = compact(emissions, labels)
        pred = torch.full_like(labels, -100)
        for row, path in enumerate(crf.viterbi(compacted, mask)):
            positions = keep[row].nonzero().squeeze(1)
            pred[row, positions] = torch.tensor(path[:len(positions)], dtype=pred.dtype, device=pred.device)
        return pred

    def word_predictions(self, ids: list[list[int]], encoded: EncodedSplit) -> list[list[str]]:
        tag_col = self.data_cfg.tags_column
        preds = []
        for ex, kept, row in zip(encoded.examples, encoded.extra["kept_words"], ids):
            words = ["O"] * len(ex[tag_col])
            for w, label_id in zip(kept, row):
                words[w] = self.labels[label_id]
            preds.append(words)
        return preds

    def evaluate(self, model: Any, dataloader: Any, accelerator: Any, encoded: EncodedSplit) -> dict:
        ids, loss = self.predict_ids(model, dataloader, accelerator)
        y_pred = self.word_predictions(ids, encoded)
        y_true = [ex[self.data_cfg.tags_column] for ex in encoded.examples]
        return score_entities(y_true, y_pred, loss)


def repair_known(tags: list[str], known: Any) -> list[str]:
    """IOB2-repaired tags (``repair_iob2``), keeping a tag whose repaired form is not a known label."""
    return [r if r in known else t for r, t in zip(repair_iob2(tags), tags)]


def crf_nll(crf: CRFClassifier, emissions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each labelled sentence's negative log-likelihood over its first-sub-token positions."""
    rows = (labels != -100).any(1)
    compacted, mask = compact(emissions[rows], labels[rows])
    tags, _ = compact(labels[rows], labels[rows])
    return crf.nll(compacted, tags.clamp(min=0), mask)


def score_entities(y_true: list[list[str]], y_pred: list[list[str]], loss: float) -> dict:
    n_words = sum(len(t) for t in y_true)
    correct = sum(a == b for t, p in zip(y_true, y_pred) for a, b in zip(t, p))
    scores = entity_scores(y_true, y_pred)
    per_type = {k: {"precision": round(v["precision"], 6), "recall": round(v["recall"], 6),
                    "f1": round(v["f1"], 6), "support": v["support"]} for k, v in scores["per_type"].items()}
    return {
        "f1": scores["f1"],
        "precision": scores["precision"],
        "recall": scores["recall"],
        "accuracy": correct / n_words if n_words else 0.0,
        "loss": loss,
        "per_type": per_type,
        "examples": len(y_true),
    }
