"""The recipe schema: the single source of truth for recipe keys, defaults and error messages.

A recipe is a YAML file with five sections::

    backbone: {name: sentence-transformers/all-MiniLM-L6-v2}
    task: token_classification
    data: {train: ..., validation: ..., test: ...}
    method: {name: lora, r: 8}
    train: {lr: 1e-3, epochs: 5}
    output: {dir: runs/lora_ner}

``load_recipe(path, overrides)`` reads it with a SafeLoader that refuses duplicate keys, applies ``key=value`` overrides,
validates every key (method options included, against the method plugin's own ``Options`` model)
and returns a :class:`Recipe`. Any problem raises :class:`~peftlab.errors.PeftlabError` with one
line naming the file, the key (and line) and what was expected. ``peftlab schema`` prints this
module's models as a reference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import PeftlabError
from .registry import METHODS, TASKS
from .validation import closest, fields_at, first_non_finite, format_validation_error, read_yaml_file, where_from


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(StrictModel):
    name: str = Field(
        description="Hugging Face model name, local folder, or a packaged model name "
        "(see `peftlab backbones`)."
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the (non-quantized) weights."
    )
    quantization: Literal["none", "int8", "nf4", "fp4"] = Field(
        "none", description="bitsandbytes quantization of the backbone's linear layers."
    )
    double_quant: bool = Field(True, description="nf4/fp4: also quantize the quantization constants.")
    unquantized_modules: list[str] = Field(
        default_factory=list,
        description="int8/nf4/fp4: more modules loaded in full precision, each a module's full name or "
        "dotted suffix (e.g. [pooler]); needed for a module the method trains in full "
        "(method.modules_to_save). The task head and layers the checkpoint lacks are always kept. "
        "With quantization none every module is already in full precision and this list is not used.",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="nf4/fp4 compute dtype; auto = bfloat16 on GPUs that support it, float16 on older GPUs, "
        "float32 on CPUs.",
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="nf4/fp4: the dtype the packed 4-bit weights are stored in. FSDP shards float tensors "
        "only: with FSDP + QLoRA set it to the dtype of the other weights (bfloat16 with backbone.dtype "
        "bfloat16), so the quantized layers are sharded too (GPU only; unverified in peftlab's tests).",
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint.")
    allow_pickle: bool = Field(
        False, description="Allow loading pickle (.bin/.pt) weights; safetensors only by default."
    )


class DataConfig(StrictModel):
    format: Literal["auto", "conll", "csv", "tsv", "jsonl", "hub"] = Field(
        "auto", description="File format; auto = from the file extension (or 'hub' when data.hub is set)."
    )
    hub: Optional[str] = Field(
        None, description="A `datasets` hub name; train/validation/test then name its splits."
    )
    hub_config: Optional[str] = Field(None, description="The hub dataset's configuration name.")
    train: str = Field(description="Training file (or split name with data.hub).")
    validation: Optional[str] = Field(
        None, description="Validation file; when absent, data.validation_split of train is held out."
    )
    test: Optional[str] = Field(None, description="Test file, evaluated once with the best model.")
    validation_split: float = Field(
        0.1, gt=0, lt=1, description="Fraction of train held out when there is no validation file."
    )
    split_seed: int = Field(42, description="Seed of the held-out split and of the max_train/test_samples subsets.")
    max_train_samples: Optional[int] = Field(
        None, gt=0, description="Train on a fixed-seed random subset of this many examples."
    )
    max_test_samples: Optional[int] = Field(
        None, gt=0, description="Test on a fixed-seed random subset of this many test examples (a cheaper score)."
    )
    text_column: str = Field("text", description="Text column (CSV/TSV/JSONL/hub).")
    label_column: str = Field("label", description="Label column for sequence classification.")
    text_pair_column: Optional[str] = Field(
        None, description="sequence_classification: a second text column, encoded with the first as a pair."
    )
    problem: Literal["single_label", "multi_label", "regression"] = Field(
        "single_label", description="sequence_classification: one label per text, a list of labels per text "
        "(sigmoid, threshold chosen on validation), or a number per text (MSE)."
    )
    label_separator: str = Field(
        "|", min_length=1, description="sequence_classification, multi_label: separator of the labels in a "
        "CSV/TSV cell (JSONL holds a list)."
    )
    tokens_column: str = Field("tokens", description="Word-list column for NER in JSONL/hub data.")
    tags_column: str = Field("tags", description="Tag-list column for NER in JSONL/hub data.")
    max_length: int = Field(128, gt=0, description="Truncate inputs to this many tokens.")
    prompt_template: str = Field(
        "{text}", description="causal_lm: prompt built from the example's columns."
    )
    completion_template: str = Field(
        " {label}", description="causal_lm: completion built from the example's columns."
    )
    use_chat_template: bool = Field(
        True, description="causal_lm: wrap the prompt in the tokenizer's chat template if it has one."
    )
    max_new_tokens: int = Field(16, gt=0, description="causal_lm: tokens generated at evaluation.")


class MethodSpec(BaseModel):
    """``name`` plus the method's own options (validated by the method plugin)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="A registered method (see `peftlab methods`).")

    def options_dict(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(StrictModel):
    optimizer: Literal["adamw"] = Field("adamw", description="Optimizer (torch AdamW).")
    fused_optimizer: bool = Field(
        True, description="Use torch's fused AdamW kernel when the device has one (CPU, CUDA); false = the "
        "per-tensor loop (slower; results differ in the last bits).",
    )
    lr: float = Field(5e-5, gt=0, description="Peak learning rate.")
    head_lr: Optional[float] = Field(
        None, gt=0, description="Learning rate of the task head (default: train.lr)."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases/norms).")
    batch_size: Union[int, Literal["auto"]] = Field(
        16, description="Per-process training batch size; auto: the largest that fits train.memory_budget "
        "(`peftlab plan --fit`), with grad_accum keeping train.target_batch_size examples per step.",
    )
    target_batch_size: int = Field(
        16, gt=0, description="With batch_size: auto, the examples per optimizer step and process (batch x "
        "grad_accum) that auto keeps.",
    )
    memory_budget: Optional[Union[int, str]] = Field(
        None, description="With batch_size: auto, the memory each process may use (e.g. 20GiB; default: what "
        "is available when it starts, shared by the processes on this machine).",
    )
    eval_batch_size: int = Field(64, gt=0, description="Per-process evaluation batch size.")
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding, faster on CPU)."
    )
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    epochs: int = Field(3, gt=0, description="Training epochs (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, gt=0, description="Stop after this many optimizer steps.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Warmup as a fraction of all steps.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warmup steps (overrides warmup_ratio).")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warmup."
    )
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Gradient clipping (null = off).")
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout.")
    eval_steps: Optional[int] = Field(
        None, gt=0, description="Evaluate every N optimizer steps (default: at the end of each epoch)."
    )
    early_stopping_patience: Optional[int] = Field(
        None, ge=1, description="Stop after this many evaluations without improvement."
    )
    metric: Optional[str] = Field(
        None, description="Validation metric that selects the best model (default: the task's)."
    )
    checkpoint_every: Optional[int] = Field(
        None, gt=0, description="Save a resumable checkpoint every N optimizer steps (and each epoch)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many resumable checkpoints to keep.")
    num_threads: Optional[int] = Field(
        None, gt=0, description="CPU threads per process (default: all cores / processes)."
    )
    cpu_mmap_threshold_mb: Optional[float] = Field(
        1.0, ge=0,
        description="CPU, glibc: serve allocations of at least this many MiB with mmap and unmap them when "
        "freed (a fixed M_MMAP_THRESHOLD), so each step's activation memory goes back to the OS instead of "
        "staying in the heap: a lower peak RSS for a little speed (benchmarks/profile_methods.py measures both). "
        "0 or null = glibc's adaptive threshold.",
    )
    cpu_fast_dropout: bool = Field(
        True,
        description="CPU: the model's nn.Dropout layers draw their masks from 16-bit random integers (p rounded "
        "to 1/65536) and keep a 1-byte mask for backward, instead of torch's float bernoulli_ mask: the same "
        "distribution in less time and memory (peftlab/dropout.py). false = torch's dropout. GPUs always use torch's.",
    )
    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError("expected a positive integer or auto")

    @field_validator("memory_budget")
    @classmethod
    def _memory_budget(cls, value: Any) -> Any:
        from .system import memory_bytes

        if value is not None and memory_bytes(value) is None:
            raise ValueError("expected a memory size such as 20GiB, 1500MiB or a number of bytes")
        return value

    def batch_size_or(self, default: int) -> int:
        """The batch size, or ``default`` when it is auto (not planned yet)."""
        return default if self.batch_size == "auto" else self.batch_size

    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    log_every: int = Field(10, gt=0, description="Log loss and lr every N optimizer steps.")
    trackers: Literal["auto", "none", "tensorboard"] = Field(
        "auto", description="accelerate trackers; auto = TensorBoard when installed."
    )


class OutputConfig(StrictModel):
    dir: Optional[str] = Field(None, description="Run folder (default: runs/<recipe file stem>).")


class Recipe(StrictModel):
    description: Optional[str] = Field(None, description="Free text, kept in the run's recipe.yaml.")
    backbone: BackboneConfig
    task: str = Field(description="A registered task (see `peftlab tasks`).")
    task_options: dict[str, Any] = Field(
        default_factory=dict, description="The task's own options (see each task below).")
    data: DataConfig
    method: MethodSpec
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    _source: str = PrivateAttr("<recipe>")
    _method_options: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_data(self) -> "Recipe":
        if self.data.hub is None and self.data.format == "hub":
            raise ValueError("data.format is 'hub' but data.hub names no dataset")
        return self

    @property
    def source(self) -> str:
        return self._source

    @property
    def method_options(self) -> Any:
        """The method's validated ``Options`` instance."""
        return self._method_options

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------- errors


# Names other tools (transformers Trainer, peft) use for the same settings: suggested when the spelling
# is not close to any key (e.g. `rank` -> `r`, `learning_rate` -> `lr`).
KEY_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "model_name": "name", "model": "name",
}


# -------------------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> list[tuple[tuple[str, ...], Any, str]]:
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise PeftlabError(
                f"command line: override '{item}' is not of the form key=value (e.g. train.epochs=1)"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        parsed.append((tuple(key.strip().split(".")), value, item))
    return parsed


def _check_override_key(path: tuple[str, ...], item: str) -> None:
    if path[0] in ("method", "task_options") and len(path) >= 2:
        return  # method and task options are checked against the plugin's own Options
    valid = list(Recipe.model_fields)
    for depth, part in enumerate(path):
        fields = fields_at(Recipe, path[:depth]) if depth else valid
        if fields is None or part not in fields:
            hint = closest(part, fields or [], KEY_ALIASES)
            where = ".".join(path[: depth + 1])
            suggestion = f" (did you mean '{'.'.join(path[:depth] + (hint,))}'?)" if hint else ""
            raise PeftlabError(f"command line: override '{item}': unknown key '{where}'{suggestion}")


def apply_overrides(data: dict, overrides: list[str], applied: Optional[dict] = None) -> dict:
    """Set each ``key=value`` in ``data``; ``applied`` (if given) records key path -> override."""
    for path, value, item in parse_overrides(overrides):
        _check_override_key(path, item)
        if path == ("method",) and isinstance(value, str):
            raise PeftlabError(
                f"command line: override '{item}': would replace every method option; to change the method "
                f"and keep the recipe's options write method.name={value}, or give them all as "
                f"method={{name: {value}, ...}}")
        if applied is not None:
            applied[path] = item
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                if path[0] == "method" and part == "method" and isinstance(child, str):
                    child = node[part] = {"name": child}
                else:
                    raise PeftlabError(
                        f"command line: override '{item}': '{part}' is not a section"
                    )
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: Path) -> tuple[dict, str]:
    data, text = read_yaml_file(path, "recipe")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PeftlabError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    return data, text


def recipe_from_dict(
    data: dict, source: str = "<recipe>", text: Optional[str] = None, default_output: Optional[str] = None,
    overrides: Optional[dict] = None,
) -> Recipe:
    """Validate a recipe given as a dict (the Python API's entry point). ``overrides`` maps the key
    paths set on the command line to their override, so an error names it instead of a line."""
    data = dict(data)
    if isinstance(data.get("method"), str):  # `method: lora` is short for `method: {name: lora}`
        data["method"] = {"name": data["method"]}
    bad = first_non_finite(data)
    if bad:
        key = ".".join(map(str, bad[0]))
        raise PeftlabError(f"{where_from(bad[0], source, text, overrides)}: {key}: must be a finite number "
                           f"(got {bad[1]})")
    errors = dict(source=source, text=text, aliases=KEY_ALIASES, overrides=overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise PeftlabError(format_validation_error(err, model=Recipe, **errors)) from None
    recipe._source = source

    try:
        task_cls = TASKS.get(recipe.task)
    except PeftlabError as exc:
        raise PeftlabError(f"{where_from(('task',), source, text, overrides)}: task: {exc}") from None
    try:
        task_options = task_cls.Options.model_validate(recipe.task_options)
    except ValidationError as err:
        raise PeftlabError(format_validation_error(err, model=task_cls.Options, prefix=("task_options",),
                                                   **errors)) from None
    recipe.task_options = task_options.model_dump(mode="json")
    try:
        method_cls = METHODS.get(recipe.method.name)
    except PeftlabError as exc:
        raise PeftlabError(f"{where_from(('method', 'name'), source, text, overrides)}: method.name: {exc}") from None
    try:
        options = method_cls.Options.model_validate(recipe.method.options_dict())
    except ValidationError as err:
        raise PeftlabError(format_validation_error(err, model=method_cls.Options, prefix=("method",),
                                                   **errors)) from None
    method_cls.check_recipe(recipe, options)  # raises PeftlabError naming the key
    recipe.method = MethodSpec(name=recipe.method.name, **options.model_dump(mode="json"))
    recipe._method_options = options
    if recipe.output.dir is None:
        recipe.output.dir = default_output or "runs/run"
    return recipe


def load_recipe(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> Recipe:
    """Read, override and validate a recipe file. Raises PeftlabError (one line) on any problem."""
    path = Path(path)
    data, text = read_yaml(path)
    applied: dict = {}
    if overrides:
        data = apply_overrides(data, list(overrides), applied)
    return recipe_from_dict(data, source=str(path), text=text, default_output=str(Path("runs") / path.stem),
                            overrides=applied)
