"""Text classification (one label per text): accuracy and macro-F1."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DataCollatorWithPadding

from ..data import check_labels, check_text_rows, load_splits
from ..metrics import macro_f1
from . import EncodedSplit, Task, batch_to_model_inputs, check_known_labels, mean_loss, register_task


@register_task
class SequenceClassification(Task):
    name = "sequence_classification"
    description = "text classification (CSV/TSV/JSONL text + label); accuracy and macro-F1"
    auto_model = "AutoModelForSequenceClassification"
    metrics = ("accuracy", "macro_f1", "loss")
    default_metric = "accuracy"

    @property
    def columns(self) -> list[str]:
        return [self.data_cfg.text_column, self.data_cfg.label_column]

    def load_splits(self):
        splits = load_splits(self.data_cfg, self.columns, kind="text")
        label_col = self.data_cfg.label_column
        every = splits.train + splits.validation + (splits.test or [])
        check_text_rows(every, [self.data_cfg.text_column])
        check_labels(every, label_col)
        for ex in splits.train:
            ex[label_col] = str(ex[label_col])
        self.set_labels(sorted({ex[label_col] for ex in splits.train}))
        known = set(self.labels)
        for name, rows in (("validation", splits.validation), ("test", splits.test or [])):
            for ex in rows:
                ex[label_col] = str(ex[label_col])
            check_known_labels(rows, label_col, known, name, is_list=False)
        return splits

    def encode(self, examples: list[dict], tokenizer: Any, split: str) -> EncodedSplit:
        text_col, label_col = self.columns
        enc = tokenizer(
            [str(ex[text_col]) for ex in examples], truncation=True, max_length=self.data_cfg.max_length
        )
        l2i = self.label2id
        features = []
        for i, ex in enumerate(examples):
            feat = {k: enc[k][i] for k in enc.keys()}
            feat["labels"] = l2i[ex[label_col]]
            features.append(feat)
        return EncodedSplit(features, examples)

    def collator(self, tokenizer: Any):
        return DataCollatorWithPadding(tokenizer)

    @torch.no_grad()
    def predict_probs(self, model: Any, dataloader: Any, accelerator: Any) -> tuple[torch.Tensor, float, int]:
        model.eval()
        probs, loss_sum, loss_n = [], 0.0, 0
        for batch in dataloader:
            outputs = model(**batch_to_model_inputs(batch))
            if outputs.loss is not None and "labels" in batch:
                loss_sum += float(outputs.loss) * len(batch["labels"])
                loss_n += len(batch["labels"])
            probs.append(accelerator.gather_for_metrics(outputs.logits.float().softmax(-1)).cpu())
        totals = accelerator.reduce(torch.tensor([loss_sum, float(loss_n)], device=accelerator.device), "sum")
        return torch.cat(probs), float(totals[0]), int(totals[1])

    def evaluate(self, model: Any, dataloader: Any, accelerator: Any, encoded: EncodedSplit) -> dict:
        probs, loss_sum, loss_n = self.predict_probs(model, dataloader, accelerator)
        pred = probs.argmax(-1).tolist()
        gold = [f["labels"] for f in encoded.features]
        return {
            "accuracy": sum(p == g for p, g in zip(pred, gold)) / len(gold),
            "macro_f1": macro_f1(gold, pred),
            "loss": mean_loss(loss_sum, loss_n),
            "examples": len(gold),
        }
