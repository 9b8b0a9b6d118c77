"""The benchmark spec (``benchmarks/<name>.yaml``): its schema and its loader.

The format is documented in ``benchmarks/README.md`` and by :class:`Spec` below.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import PeftlabError
from ..validation import format_validation_error, read_yaml_file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class Profile(_Strict):
    """A named variant of the spec (``--quick``, ``--profile NAME``): its keys replace or extend the spec's."""

    seeds: Optional[list[int]] = Field(None, description="Seeds (replace the spec's; a configuration's own seeds win).")
    overrides: list[str] = Field(default_factory=list, description="Appended to every cell's overrides.")
    data: dict[str, Any] = Field(default_factory=dict, description="data.<key> overrides for every cell.")
    methods: Optional[list[str]] = Field(None, description="Only these configurations (names or patterns).")
    timeout_s: Optional[float] = Field(None, gt=0)


class Spec(_Strict):
    name: Optional[str] = Field(None, description="Benchmark name (default: the spec's file stem).")
    description: Optional[str] = None
    recipe: Optional[str] = Field(None, description="Base recipe for configurations that name none.")
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
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
        if m.compare_to is not None and m.compare_to not in names:
            raise PeftlabError(f"{path}: methods: '{m.name}': compare_to '{m.compare_to}' is not a configuration")
    return spec
