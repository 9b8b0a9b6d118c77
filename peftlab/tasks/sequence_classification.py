"""Text classification: one text or a pair of texts (``data.text_pair_column``) per example, and
``data.problem``: one label (softmax; accuracy, macro-F1), several labels (sigmoid + BCE; micro- and
macro-F1 at a threshold chosen on validation) or a number (MSE; Pearson, Spearman)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import DataCollatorWithPadding

from ..data import check_labels, check_text_rows, load_splits
from ..errors import PeftlabError
from ..metrics import macro_f1, multilabel_f1, pearson, spearman
from . import EncodedSplit, LossTally, Task, batch_to_model_inputs, check_known_labels, register_task

PROBLEM_METRICS = {
    "single_label": ("accuracy", "macro_f1", "loss"),
    "multi_label": ("micro_f1", "macro_f1", "subset_accuracy", "loss"),
    "regression": ("pearson", "spearman", "mse", "loss"),
}
HF_PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                    "regression": "regression"}
THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 20)]  # multi-label thresholds tried on validation


@register_task
class SequenceClassification(Task):
    name = "sequence_classification"
    description = "text or text-pair classification (CSV/TSV/JSONL): one label, several labels, or a score"
    auto_model = "AutoModelForSequenceClassification"
    metrics = tuple(dict.fromkeys(m for ms in PROBLEM_METRICS.values() for m in ms))
    default_metric = "accuracy"
    lower_is_better = ("loss", "mse")
    peft_task_type = "SEQ_CLS"
    pipeline_tag = "text-classification"

    def __init__(self, recipe: Any):
        super().__init__(recipe)
        self.problem = self.data_cfg.problem
        self.threshold = 0.5  # multi_label: set by each non-test evaluation, and from the best one before test

    @classmethod
    def usage_code(cls, name: str) -> list[str]:
        return ["from transformers import pipeline", "",
                f'classify = pipeline("text-classification", model="{name}")',
                'print(classify("my card still has not arrived"))']

    def check_metric(self, metric: Optional[str]) -> str:
        allowed = PROBLEM_METRICS[self.problem]
        metric = metric or allowed[0]
        if metric not in allowed:
            raise PeftlabError(f"train.metric: '{metric}' is not a metric of {self.name} with data.problem "
                               f"{self.problem} (choose one of: {', '.join(allowed)})")
        return metric

    @property
    def text_columns(self) -> list[str]:
        pair = self.data_cfg.text_pair_column
        return [self.data_cfg.text_column] + ([pair] if pair else [])

    @property
    def columns(self) -> list[str]:
        return [*self.text_columns, self.data_cfg.label_column]

    # -- data -------------------------------------------------------------------------------------
    def column_keys(self) -> dict[str, str]:
        cfg = self.data_cfg
        pair = {cfg.text_pair_column: "data.text_pair_column"} if cfg.text_pair_column else {}
        return {cfg.text_column: "data.text_column", **pair, cfg.label_column: "data.label_column"}

    def load_splits(self):
        empty_ok = (self.data_cfg.label_column,) if self.problem == "multi_label" else ()
        splits = load_splits(self.data_cfg, self.columns, kind="text", may_be_empty=empty_ok,
                             named_by=self.column_keys())
        check_text_rows(splits.rows(), self.text_columns)
        {"single_label": self._single_labels, "multi_label": self._multi_labels,
         "regression": self._scores}[self.problem](splits)
        return splits

    def _single_labels(self, splits) -> None:
        col = self.data_cfg.label_column
        every = splits.rows()
        check_labels(every, col)
        for ex in every:
            ex[col] = str(ex[col])
        self.set_labels(sorted({ex[col] for ex in splits.train}))
        for name, rows in (("validation", splits.validation), ("test", splits.test or [])):
            check_known_labels(rows, col, set(self.labels), name, is_list=False)

    def _multi_labels(self, splits) -> None:
        col, sep = self.data_cfg.label_column, self.data_cfg.label_separator
        for ex in splits.rows():
            value = ex[col]
            if isinstance(value, str):
                value = [v.strip() for v in value.split(sep) if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PeftlabError(f"{ex['_where']}: label '{col}' is {type(value).__name__}; expected a list of "
                                   f"strings or labels joined by '{sep}' (data.problem: multi_label)")
            ex[col] = sorted(set(value))
        self.set_labels(sorted({label for ex in splits.train for label in ex[col]}))
        if not self.labels:
            raise PeftlabError(f"{self.data_cfg.train}: no row has a label (data.problem: multi_label)")
        for name, rows in (("validation", splits.validation), ("test", splits.test or [])):
            check_known_labels(rows, col, set(self.labels), name, is_list=True)

    def _scores(self, splits) -> None:
        col = self.data_cfg.label_column
        for ex in splits.rows():
            value = ex[col]
            try:
                number = float(value) if not isinstance(value, bool) else math.nan
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise PeftlabError(f"{ex['_where']}: label '{col}' is {value!r}; expected a finite number "
                                   f"(data.problem: regression)")
            ex[col] = number
        self.set_labels(["score"])

    # -- model ------------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        return {**super().model_kwargs(), "problem_type": HF_PROBLEM_TYPES[self.problem]}

    def encode(self, examples: list[dict], tokenizer: Any, split: str) -> EncodedSplit:
        texts = [[str(ex[c]) for ex in examples] for c in self.text_columns]
        enc = tokenizer(*texts, truncation=True, max_length=self.data_cfg.max_length)
        features = []
        for i, ex in enumerate(examples):
            feat = {k: enc[k][i] for k in enc.keys()}
            feat["labels"] = self._target(ex[self.data_cfg.label_column])
            features.append(feat)
        return EncodedSplit(features, examples, {"split": split})

    def _target(self, label: Any) -> Any:
        if self.problem == "multi_label":
            chosen = set(label)
            return [1.0 if name in chosen else 0.0 for name in self.labels]
        return float(label) if self.problem == "regression" else self.label2id[label]

    def count_items(self, batch: dict) -> int:
        return int(batch["labels"].shape[0])  # one loss term per example, whatever the label's shape

    def collator(self, tokenizer: Any):
        return DataCollatorWithPadding(tokenizer)

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_scores(self, model: Any, dataloader: Any, accelerator: Any) -> tuple[torch.Tensor, float]:
        """Per example: softmax probabilities, sigmoid probabilities (multi_label) or the score; the mean loss."""
        model.eval()
        out, tally = [], LossTally()
        for batch in dataloader:
            logits = model(**{k: v for k, v in batch_to_model_inputs(batch).items() if k != "labels"}).logits.float()
            labels = batch.get("labels")
            row_loss = self.row_losses(logits, labels) if labels is not None else torch.zeros(len(logits), device=logits.device)
            scores, row_loss, rows = accelerator.gather_for_metrics(
                (self.scores_of(logits), row_loss, torch.full_like(row_loss, float(labels is not None))))
            tally.add(row_loss, rows)
            out.append(scores.cpu())
        return torch.cat(out), tally.mean()

    def row_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each example's term of the model's own loss for the problem (transformers' problem_type)."""
        if self.problem == "regression":
            return (logits.view(-1) - labels.float().view(-1)) ** 2
        if self.problem == "multi_label":
            return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(1)
        return F.cross_entropy(logits, labels, reduction="none")

    def scores_of(self, logits: torch.Tensor) -> torch.Tensor:
        if self.problem == "multi_label":
            return logits.sigmoid()
        return logits[:, 0] if self.problem == "regression" else logits.softmax(-1)

    def use_dev_metrics(self, dev: dict) -> None:
        self.threshold = float(dev.get("threshold", self.threshold))

    def evaluate(self, model: Any, dataloader: Any, accelerator: Any, encoded: EncodedSplit) -> dict:
        scores, loss = self.predict_scores(model, dataloader, accelerator)
        gold = [f["labels"] for f in encoded.features]
        metrics = {"single_label": self._score_single, "multi_label": self._score_multi,
                   "regression": self._score_regression}[self.problem](scores, gold, encoded)
        return {**metrics, "loss": loss, "examples": len(gold)}

    @staticmethod
    def _score_single(probs: torch.Tensor, gold: list, encoded: EncodedSplit) -> dict:
        pred = probs.argmax(-1).tolist()
        return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / len(gold), "macro_f1": macro_f1(gold, pred)}

    def _score_multi(self, probs: torch.Tensor, gold: list, encoded: EncodedSplit) -> dict:
        gold_int = [[int(v) for v in row] for row in gold]

        def at(t: float) -> dict:
            pred = (probs >= t).int().tolist()
            micro, macro = multilabel_f1(gold_int, pred)
            exact = sum(p == g for p, g in zip(pred, gold_int)) / len(gold_int)
            return {"micro_f1": micro, "macro_f1": macro, "subset_accuracy": exact, "threshold": t}

        if encoded.extra.get("split") != "test":  # choose on this split; test uses the best dev's
            self.threshold = max(THRESHOLDS, key=lambda t: (at(t)["micro_f1"], -abs(t - 0.5)))
        return at(self.threshold)

    @staticmethod
    def _score_regression(scores: torch.Tensor, gold: list, encoded: EncodedSplit) -> dict:
        pred = scores.tolist()
        mse = sum((p - g) ** 2 for p, g in zip(pred, gold)) / len(gold)
        return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold), "mse": mse}
