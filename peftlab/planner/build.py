"""What the planner builds from a recipe: its data (the longest batch, batches to time), the full-depth
model on meta tensors (weights) and shallow real copies (the trace)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import PeftlabError

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class PlanData:
    task: Any
    tokenizer: Any
    train: Any  # EncodedSplit
    evals: list  # EncodedSplit of validation (and test)


def load_data(recipe: Any) -> PlanData:
    """The recipe's splits encoded as training encodes them."""
    from ..backbones import check_max_length, load_tokenizer
    from ..tasks import get_task_class

    task = get_task_class(recipe.task)(recipe)
    splits = task.load_splits()
    tokenizer = load_tokenizer(recipe.backbone)
    check_max_length(recipe.backbone, recipe.data.max_length)
    train = task.encode(splits.train, tokenizer, "train")
    evals = [task.encode(splits.validation, tokenizer, "validation")]
    if splits.test is not None:
        evals.append(task.encode(splits.test, tokenizer, "test"))
    return PlanData(task, tokenizer, train, evals)


def collate(data: PlanData, split: Any, indices: list[int]) -> dict:
    """Examples ``indices`` of ``split``, collated (and padded) as training does."""
    return data.task.collator(data.tokenizer)([split[i] for i in indices])


def batch_of(data: PlanData, split: Any, size: int) -> dict:
    """The ``size`` longest examples of ``split``, collated as training does."""
    lengths = split.lengths()
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return collate(data, split, order[:size])


def epoch_batches(data: PlanData, recipe: Any, size: int) -> list[list[int]]:
    """The first epoch's batches (example indices) as the run forms them: length-grouped by its
    sampler with its seed, or shuffled."""
    from ..tasks import LengthGroupedEpochSampler

    lengths = data.train.lengths()
    if recipe.train.group_by_length:
        order = list(LengthGroupedEpochSampler(lengths, size, recipe.train.seed))
    else:
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(recipe.train.seed)).tolist()
    return [order[i:i + size] for i in range(0, len(order), size)]


def padded_size(lengths: list[int], batch: list[int]) -> int:
    """Tokens of a batch padded to its longest example."""
    return len(batch) * max(lengths[i] for i in batch)


def later_batch(data: PlanData, recipe: Any, size: int) -> Optional[dict]:
    """The largest training batch after the first, where a run sees each example once at most: its
    length-grouped order puts the longest example in the first batch, which then runs before any
    optimizer state exists. None where the longest batch can come again with the state (more than one
    epoch, shuffled batches, a single step)."""
    cfg = recipe.train
    if not cfg.group_by_length:
        return None
    lengths = data.train.lengths()
    batches = epoch_batches(data, recipe, size)
    steps = cfg.max_steps * cfg.grad_accum if cfg.max_steps else cfg.epochs * len(batches)
    if steps > len(batches) or steps < 2:
        return None
    largest = max(batches[1:steps], key=lambda b: padded_size(lengths, b))
    return collate(data, data.train, largest)


@dataclass
class TimingBatches:
    """The batches a step is timed on, their padded sizes (examples x longest) and the epoch's means."""

    batches: list[dict]
    sizes: list[int]
    epoch_size: float  # padded tokens per batch, mean over the epoch
    epoch_tokens: float  # real (non-padding) tokens per batch, mean over the epoch


def timing_batches(data: PlanData, recipe: Any, size: int, count: int = 4) -> TimingBatches:
    """``count`` of the run's own first-epoch batches, one at the middle of each ``count``-th of them
    ordered by padded size. Their mean size is under the epoch's where a few batches are long (8-10%
    on the intent recipes), so the step time is read at the epoch's mean size (``step_at``)."""
    lengths = data.train.lengths()
    padded = (lambda b: padded_size(lengths, b))
    batches = sorted(epoch_batches(data, recipe, size), key=lambda b: (padded(b), b))
    picks = [batches[min(len(batches) - 1, int((k + 0.5) * len(batches) / count))] for k in range(count)]
    return TimingBatches([collate(data, data.train, b) for b in picks], [padded(b) for b in picks],
                         sum(map(padded, batches)) / len(batches), sum(lengths) / len(batches))


def longest_eval(data: PlanData, size: int) -> Optional[dict]:
    splits = [s for s in data.evals if len(s)]
    if not splits:
        return None
    split = max(splits, key=lambda s: max(s.lengths()))
    return batch_of(data, split, size)


def layer_count(config: Any) -> int:
    for key in LAYER_KEYS:
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise PeftlabError(f"plan: the backbone's config ({type(config).__name__}) names no layer count "
                       f"({', '.join(LAYER_KEYS)})")


def model_config(recipe: Any, task: Any, tokenizer: Any, path: str) -> Any:
    from transformers import AutoConfig

    kwargs = {k: v for k, v in task.model_kwargs().items() if k not in ("dtype", "use_safetensors")}
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    return AutoConfig.from_pretrained(path, revision=recipe.backbone.revision,
                                      trust_remote_code=recipe.backbone.trust_remote_code, **kwargs)


def apply_method(recipe: Any, task: Any, model: Any, quantized: bool = False) -> tuple[Any, dict]:
    """The recipe's method on ``model`` as training applies it; returns the model and its trainable
    parameters. ``quantized``: ``model`` was loaded with the recipe's quantization."""
    from ..backbones import find_head_names
    from ..methods import MethodContext
    from ..runs import build_method

    method = build_method(recipe)
    backbone = recipe.backbone if quantized else recipe.backbone.model_copy(update={"quantization": "none"})
    ctx = MethodContext(task=task, backbone=backbone, head_names=find_head_names(model))
    model = method.apply(model, ctx)
    return model, method.trainable_parameters(model)


def meta_model(recipe: Any, task: Any, config: Any) -> Any:
    from accelerate import init_empty_weights

    from ..backbones import auto_class

    with init_empty_weights():
        model = auto_class(task.auto_model).from_config(config, trust_remote_code=recipe.backbone.trust_remote_code)
    model.tie_weights()
    return task.prepare_model(model)


def shallow_model(recipe: Any, task: Any, config: Any, layers: int, device: Any = None) -> tuple[Any, dict]:
    """The backbone's architecture with ``layers`` layers, random weights in the recipe's dtype (and
    quantization, on ``device``), the task head and the method applied."""
    import copy

    from ..backbones import auto_class

    config = copy.deepcopy(config)
    for key in LAYER_KEYS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, layers)
    for key in ("layer_types",):  # per-layer lists (sliding/full attention) follow the depth
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, getattr(config, key)[:layers])
    model = auto_class(task.auto_model).from_config(
        config, dtype=getattr(torch, recipe.backbone.dtype), trust_remote_code=recipe.backbone.trust_remote_code)
    if recipe.backbone.quantization == "none":
        return apply_method(recipe, task, task.prepare_model(model))
    return apply_method(recipe, task, _quantized_copy(recipe, task, model, device), quantized=True)


def _quantized_copy(recipe: Any, task: Any, model: Any, device: Any) -> Any:
    """``model`` saved and loaded again through the run's own quantized load (bitsandbytes layers,
    the same modules kept in full precision)."""
    import tempfile

    from ..backbones import load_task_model

    with tempfile.TemporaryDirectory(prefix="peftlab-plan-") as tmp:
        model.save_pretrained(tmp)  # safetensors; the load copies what it keeps out of the file
        return load_task_model(recipe.backbone, task, {"config": model.config}, path=tmp, device=device)
