"""The benchmark spec (``benchmarks/<name>.yaml``): its schema and its loader.

The format is documented in ``benchmarks/README.md`` and by :class:`Spec` below.
"""

from __future__ import annotations

import math
import os
import random
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import PeftlabError
from ..validation import format_validation_error, read_yaml_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Where a sampled key's values come from: exactly one of these."""

    choice: Optional[list[Any]] = Field(None, min_length=1, description="One of these values.")
    uniform: Optional[tuple[float, float]] = Field(None, description="A float in [low, high].")
    loguniform: Optional[tuple[float, float]] = Field(None, description="A float in [low, high], uniform in log scale.")
    randint: Optional[tuple[int, int]] = Field(None, description="An integer in [low, high], both included.")

    @model_validator(mode="after")
    def _one(self) -> "Distribution":
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, randint")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError("[low, high] needs low < high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    @property
    def log_scale(self) -> bool:
        return self.loguniform is not None

    def draw(self, rng: random.Random) -> Any:
        """One value (floats to 4 significant digits, so that labels and overrides stay readable)."""
        if self.choice is not None:
            return self.choice[rng.randrange(len(self.choice))]
        if self.randint is not None:
            return rng.randint(*self.randint)
        if self.loguniform is not None:
            low, high = self.loguniform
            return float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.4g}")
        return float(f"{rng.uniform(*self.uniform):.4g}")


class EarlyStopping(_Strict):
    """Asynchronous successive halving (Ray Tune's ASHA) on each trial's dev metric, as its
    evaluations come in: ``peftlab sweep`` only (``peftlab bench`` runs every cell to its end)."""

    grace_evaluations: int = Field(1, ge=1, description="Every trial runs at least this many evaluations.")
    reduction_factor: int = Field(3, ge=2, description="At each rung (grace x reduction_factor^k evaluations) "
                                  "only the best 1/reduction_factor of the trials that reached it go on.")


class ConfigEntry(_Strict):
    """One configuration (a row of the report)."""

    name: str = Field(description="Configuration label, unique in the spec (e.g. lora, nf4-qlora).")
    recipe: Optional[str] = Field(None, description="Recipe path (default: the spec's recipe).")
    method: Optional[dict[str, Any]] = Field(
        None, description="Replace the recipe's whole method section, e.g. {name: lora, r: 4}."
    )
    overrides: list[str] = Field(default_factory=list, description="key=value overrides for this configuration.")
    data: dict[str, Any] = Field(default_factory=dict, description="data.<key> overrides for this configuration.")
    quantization: Optional[Union[str, list[str]]] = Field(
        None, description="backbone.quantization value(s); a list makes one configuration per value."
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="key -> list of values; one configuration per combination."
    )
    sample: dict[str, Distribution] = Field(
        default_factory=dict, description="key -> distribution; `samples` configurations drawn from them "
        "(seeded by the spec's sample_seed), each crossed with the grid.",
    )
    samples: Optional[int] = Field(None, ge=1, description="How many configurations to draw from `sample`.")
    seeds: Optional[list[int]] = Field(None, description="Seeds of this configuration (default: the spec's).")
    script: Optional[str] = Field(
        None, description="Run this Python script instead of `peftlab train` (same arguments): a baseline."
    )
    compare_to: Optional[str] = Field(None, description="Baseline: the configuration it is compared with.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables of the cell.")
    timeout_s: Optional[float] = Field(None, gt=0, description="Per-cell time limit (default: the spec's).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", v):
            raise ValueError("use letters, digits and . _ + = - only")
        return v


RunOrder = Literal["configuration", "seed"]
ORDER_HELP = ("Run order: `configuration` (every seed of one configuration, then the next) or `seed` (rounds: "
              "every configuration once per seed, so the machine's drift spreads over all of them).")


class Profile(_Strict):
    """A named variant of the spec (``--quick``, ``--profile NAME``): its keys replace or extend the spec's."""

    seeds: Optional[list[int]] = Field(None, description="Seeds (replace the spec's; a configuration's own seeds win).")
    overrides: list[str] = Field(default_factory=list, description="Appended to every cell's overrides.")
    data: dict[str, Any] = Field(default_factory=dict, description="data.<key> overrides for every cell.")
    methods: Optional[list[str]] = Field(None, description="Only these configurations (names or patterns).")
    timeout_s: Optional[float] = Field(None, gt=0)
    order: Optional[RunOrder] = Field(None, description=ORDER_HELP)


class Spec(_Strict):
    name: Optional[str] = Field(None, description="Benchmark name (default: the spec's file stem).")
    description: Optional[str] = None
    recipe: Optional[str] = Field(None, description="Base recipe for configurations that name none.")
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    order: RunOrder = Field("configuration", description=ORDER_HELP)
    backbones: Optional[list[str]] = Field(
        None, description="Backbone axis (backbone.name values); default: each recipe's own backbone."
    )
    data: dict[str, Any] = Field(default_factory=dict, description="data.<key> overrides for every cell.")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides for every cell.")
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: Optional[float] = Field(None, gt=0, description="Per-cell time limit in seconds.")
    results: Optional[str] = Field(None, description="Results folder (default: <spec folder>/results/<name>).")
    work: Optional[str] = Field(None, description="Cell work folder (default: <spec folder>/work/<name>).")
    methods: list[ConfigEntry] = Field(min_length=1, description="The configurations.")
    predict_memory: bool = Field(True, description="Run `peftlab plan` before each peftlab cell (its prediction "
                                 "goes into the record and the report's predicted-peak column).")
    sample_seed: int = Field(0, description="Seed of the draws of every configuration's `sample`.")
    early_stopping: Optional[EarlyStopping] = Field(None, description="ASHA early stopping (peftlab sweep).")
    reference: Optional[str] = Field(
        None, description="A configuration the report divides every other's throughput and memory by (same run)."
    )
    quick: Optional[Profile] = Field(None, description="The --quick profile (few steps, one seed) for CI.")
    profiles: dict[str, Profile] = Field(
        default_factory=dict, description="Other named profiles, run with --profile NAME (e.g. gpu: a short run on CUDA)."
    )


def load_spec(path: Union[str, os.PathLike]) -> Spec:
    path = Path(path)
    data, text = read_yaml_file(path, "benchmark spec")
    if not isinstance(data, dict):
        raise PeftlabError(f"{path}: a benchmark spec must be a YAML mapping")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as err:
        raise PeftlabError(format_validation_error(err, path, Spec, text=text)) from None
    names = [m.name for m in spec.methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PeftlabError(f"{path}: methods: configuration name '{dup[0]}' is used twice")
    for m in spec.methods:
        if m.recipe is None and spec.recipe is None:
            raise PeftlabError(f"{path}: methods: '{m.name}' names no recipe and the spec has no base recipe")
        if bool(m.sample) != (m.samples is not None):
            raise PeftlabError(f"{path}: methods: '{m.name}': `sample` and `samples` go together")
        if m.compare_to is not None and m.compare_to not in names:
            raise PeftlabError(f"{path}: methods: '{m.name}': compare_to '{m.compare_to}' is not a configuration")
    return spec
