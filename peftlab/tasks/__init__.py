"""Tasks. A task knows how to read its data, encode it, build its model and score it.

A task is one module with a subclass of :class:`Task` registered with ``@register_task`` (and the
module's name in ``peftlab.registry.TASKS``); third-party packages register through the entry-point
group ``peftlab.tasks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import PeftlabError
from ..registry import TASKS


class NoOptions(BaseModel):
    """A task's own recipe keys (``task_options:``); a task without any accepts none."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

class Task:
    """Base class. Subclasses set the class attributes and implement the methods below; everything
    task-specific that training, merging, cards and prediction need is asked of the task class."""

    name: ClassVar[str]
    description: ClassVar[str]
    auto_model: ClassVar[str]  # name of the transformers Auto class
    metrics: ClassVar[tuple[str, ...]]  # metric names usable as train.metric
    default_metric: ClassVar[str]
    lower_is_better: ClassVar[tuple[str, ...]] = ("loss", "perplexity")
    peft_task_type: ClassVar[Optional[str]] = None  # peft's TaskType for this head (TOKEN_CLS, ...)
    pipeline_tag: ClassVar[Optional[str]] = None  # the transformers pipeline of a merged checkpoint
    has_labels: ClassVar[bool] = True  # a label set (config id2label) that the head predicts
    Options: ClassVar[type[BaseModel]] = NoOptions  # validates the recipe's task_options
    input_file: ClassVar[str] = "texts.txt"  # an example `peftlab predict --input` file name (cards)

    @classmethod
    def architecture(cls) -> str:
        """The suffix of a transformers architecture with this task's head (``ForTokenClassification``)."""
        return cls.auto_model.removeprefix("AutoModel")

    @classmethod
    def usage_code(cls, name: str) -> list[str]:
        """Python lines that use a merged checkpoint of this task without peftlab (model cards)."""
        return ["from transformers import pipeline", "",
                f'model = pipeline("{cls.pipeline_tag}", model="{name}")'] if cls.pipeline_tag else [
            f"from transformers import {cls.auto_model}", "", f'model = {cls.auto_model}.from_pretrained("{name}")']

    @classmethod
    def predict_command(cls, name: str) -> str:
        """A ``peftlab predict`` command line for the folder ``name`` (cards)."""
        return f'peftlab predict {name} "some text"'

    @classmethod
    def predict_input(cls) -> str:
        """One input of ``peftlab.api.predict(folder, [...])`` as Python source (cards)."""
        return '"some text"'

    def card_notes(self) -> list[str]:
        """Markdown paragraphs a merged checkpoint's card adds after its usage snippet."""
        return []

    def __init__(self, recipe: Any):
        self.recipe = recipe
        self.data_cfg = recipe.data
        self.options = self.Options.model_validate(getattr(recipe, "task_options", None) or {})
        self.labels: list[str] = []

    # -- data -------------------------------------------------------------------------------------
    def load_splits(self):  # -> peftlab.data.Splits
        raise NotImplementedError

    def column_keys(self) -> dict[str, str]:
        """Each data column this task reads, mapped to the recipe key that names it, so that a file
        without the column says which key to change (``{"text": "data.text_column", ...}``)."""
        return {}

    def set_labels(self, labels: list[str]) -> None:
        self.labels = list(labels)

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def encode(self, examples: list[dict], tokenizer: Any, split: str) -> "EncodedSplit":
        raise NotImplementedError

    def collator(self, tokenizer: Any):
        raise NotImplementedError

    # -- model ------------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": self.label2id,
        }

    def merged_model(self, model: Any) -> Any:
        """The merged model just before it is saved as a plain checkpoint: a task that feeds its model
        differently from a plain transformers user makes the checkpoint answer the same either way."""
        return model

    def prepare_model(self, model: Any, path: Optional[str] = None) -> Any:
        """The transformers model just loaded from ``path`` (the backbone, or a saved checkpoint),
        made this task's model: a task whose head transformers lacks installs it here and reads its
        extra tensors from ``path``. Every load goes through it (training, runs, merges, predict)."""
        return model

    # -- training ---------------------------------------------------------------------------------
    def training_loss(self, model: Any, batch: dict) -> torch.Tensor:
        """The mean loss over the batch's items (default: the model's own loss)."""
        return model(**batch_to_model_inputs(batch)).loss

    def count_items(self, batch: dict) -> int:
        """How many loss terms the batch holds (its labels other than -100: tokens for tagging,
        examples for classification). The trainer weighs every item of an optimizer step alike."""
        return int((batch["labels"] != -100).sum())

    def loss_sum(self, model: Any, batch: dict) -> torch.Tensor:
        """The sum of the batch's per-item losses: the trainer divides it by the items of the whole
        optimizer step (every micro-batch of the accumulation, every process)."""
        return self.training_loss(model, batch) * self.count_items(batch)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, model: Any, dataloader: Any, accelerator: Any, encoded: "EncodedSplit") -> dict:
        raise NotImplementedError

    def output_logits(self, outputs: Any) -> dict[str, torch.Tensor]:
        """The logits a merged checkpoint must reproduce, by name: (batch, classes) for a sequence
        head, (batch, positions, classes) for a token head. Verification compares each and the
        argmax over its last dimension."""
        return {"logits": outputs.logits}

    def use_dev_metrics(self, dev: dict) -> None:
        """Before the test evaluation: the best model's validation metrics (a task that chooses
        something on validation, such as a decision threshold, takes it from them)."""

    def metric_mode(self, metric: str) -> str:
        return "min" if metric in self.lower_is_better else "max"

    def check_metric(self, metric: Optional[str]) -> str:
        metric = metric or self.default_metric
        if metric not in self.metrics:
            raise PeftlabError(
                f"train.metric: '{metric}' is not a metric of task {self.name} "
                f"(choose one of: {', '.join(self.metrics)})"
            )
        return metric


@dataclass
class Plan:
    """Part of a prediction (``peftlab predict``, a server's batch): the ``indices`` of the inputs it
    answers, the model inputs of its forward passes (``batches``, on the CPU), ``take(j, output)``
    called right after batch j's forward (in the same thread), and ``finish()``, those inputs' rows.
    Whoever runs the forwards decides how: one model, or several adapters' batches in one pass."""

    indices: list[int]
    batches: list[dict]
    take: Callable[[int, Any], None]
    finish: Callable[[], list[dict]]

    def place(self, results: list) -> None:
        """Put the finished rows at their inputs' positions in ``results``."""
        for i, row in zip(self.indices, self.finish()):
            results[i] = row


class EncodedSplit(torch.utils.data.Dataset):
    """Model inputs (one dict per example) plus host-side bookkeeping for scoring."""

    def __init__(self, features: list[dict], examples: list[dict], extra: Optional[dict] = None):
        self.features = features
        self.examples = examples
        self.extra = extra or {}

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]

    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]

    def sorted_by_length(self) -> "EncodedSplit":
        """The same examples, longest first (evaluation order does not change the scores)."""
        order = sorted(range(len(self)), key=lambda i: -len(self.features[i]["input_ids"]))
        extra = {k: [v[i] for i in order] if isinstance(v, list) and len(v) == len(self) else v
                 for k, v in self.extra.items()}
        return EncodedSplit([self.features[i] for i in order], [self.examples[i] for i in order], extra)

    def num_tokens(self) -> int:
        return sum(len(f["input_ids"]) for f in self.features)


def check_known_labels(examples: list[dict], key: str, known: set, split: str, is_list: bool) -> None:
    for ex in examples:
        values = ex[key] if is_list else [ex[key]]
        for value in values:
            if value not in known:
                raise PeftlabError(
                    f"{ex['_where']}: label '{value}' in the {split} split does not occur in train "
                    f"(train labels: {', '.join(sorted(known)[:12])}{', ...' if len(known) > 12 else ''})"
                )


class LossTally:
    """An evaluation loss over a split's items, each counted once. Tasks add per-row loss sums and
    item counts *after* ``accelerator.gather_for_metrics``, which drops the rows accelerate repeats to
    give every process an equal last batch (summing before the gather counted those rows twice)."""

    def __init__(self) -> None:
        self.total, self.items = 0.0, 0.0

    def add(self, row_loss: torch.Tensor, row_items: torch.Tensor) -> None:
        self.total += float(row_loss.double().sum())
        self.items += float(row_items.double().sum())

    def mean(self) -> float:
        return self.total / self.items if self.items else math.nan


def batch_to_model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


class LengthGroupedEpochSampler(torch.utils.data.Sampler):
    """transformers' LengthGroupedSampler, reseeded each epoch (``set_epoch``) so that the order of
    epoch e depends only on (seed, e): a resumed run sees exactly the batches it would have seen."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        self.generator = torch.Generator()
        self.inner = LengthGroupedSampler(batch_size, lengths=lengths, generator=self.generator)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return iter(self.inner)


TASKS.configure(Task)
register_task = TASKS.register
available_tasks = TASKS.available
get_task_class = TASKS.get
