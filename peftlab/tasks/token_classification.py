"""Named-entity recognition / token tagging, scored at entity level as seqeval scores it (peftlab.metrics).

Labels are aligned to the first sub-token of each word (the rest get -100). Scoring is against
every gold word: a word that got no sub-token (an emoji the tokenizer drops, a truncated tail) is
predicted ``O``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DataCollatorForTokenClassification

from ..data import check_token_rows, load_splits
from ..metrics import entity_scores
from . import EncodedSplit, Task, batch_to_model_inputs, check_known_labels, mean_loss, register_task


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

    @classmethod
    def usage_code(cls, name: str) -> list[str]:
        return ["from transformers import pipeline", "",
                f'ner = pipeline("token-classification", model="{name}", aggregation_strategy="simple")',
                'print(ner("Heading to the Eiffel Tower with Emma tomorrow"))']

    @property
    def columns(self) -> list[str]:
        return [self.data_cfg.tokens_column, self.data_cfg.tags_column]

    def load_splits(self):
        splits = load_splits(self.data_cfg, self.columns, kind="tokens")
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
        features, kept_words = [], []
        for i, ex in enumerate(examples):
            word_ids = enc.word_ids(i)
            labels, kept, previous = [], [], None
            for w in word_ids:
                if w is None or w == previous:
                    labels.append(-100)
                else:
                    labels.append(l2i[ex[tag_col][w]])
                    kept.append(w)
                previous = w
            feat = {k: enc[k][i] for k in enc.keys()}
            feat["labels"] = labels
            features.append(feat)
            kept_words.append(kept)
        return EncodedSplit(features, examples, {"kept_words": kept_words})

    def collator(self, tokenizer: Any):
        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=None)

    @torch.no_grad()
    def predict_ids(self, model: Any, dataloader: Any, accelerator: Any) -> tuple[list[list[int]], float, int]:
        """Label ids at every labelled (first sub-token) position, per example, in order."""
        model.eval()
        out: list[list[int]] = []
        loss_sum, loss_n = 0.0, 0
        for batch in dataloader:
            outputs = model(**batch_to_model_inputs(batch))
            if outputs.loss is not None:
                n = int((batch["labels"] != -100).sum())
                loss_sum += float(outputs.loss) * n
                loss_n += n
            pred = outputs.logits.argmax(-1)
            labels = batch["labels"]
            pred = accelerator.pad_across_processes(pred, dim=1, pad_index=-100)
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
            pred, labels = accelerator.gather_for_metrics((pred, labels))
            for p, lab in zip(pred.tolist(), labels.tolist()):
                out.append([pi for pi, li in zip(p, lab) if li != -100])
        totals = accelerator.reduce(torch.tensor([loss_sum, float(loss_n)], device=accelerator.device), "sum")
        return out, float(totals[0]), int(totals[1])

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
        ids, loss_sum, loss_n = self.predict_ids(model, dataloader, accelerator)
        y_pred = self.word_predictions(ids, encoded)
        y_true = [ex[self.data_cfg.tags_column] for ex in encoded.examples]
        return score_entities(y_true, y_pred, mean_loss(loss_sum, loss_n))


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
