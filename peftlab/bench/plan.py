"""A spec resolved into its cells: one (configuration, seed) pair each, with the overrides it runs with."""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..errors import PeftlabError
from ..recipe import apply_overrides, read_yaml
from .spec import ConfigEntry, Spec, load_spec

DEFAULT_OVERRIDES = ["train.trackers=none"]  # logging to TensorBoard is not part of what is measured


@dataclass
class Cell:
    """One (configuration, seed) pair, fully resolved."""

    id: str
    config: str
    seed: int
    order: int
    recipe: Optional[str]
    overrides: list[str]  # everything but output.dir, in order
    script: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: Optional[float] = None
    compare_to: Optional[str] = None
    axes: dict[str, Any] = field(default_factory=dict)  # quantization / backbone / grid values of the config
    recipe_hash: str = ""
    method: Optional[str] = None
    method_options: dict = field(default_factory=dict)
    backbone: Optional[str] = None
    quantization: str = "none"
    task: Optional[str] = None
    problem: Optional[str] = None  # a problem found before launching (missing recipe, bad override)

    @property
    def kind(self) -> str:
        return "baseline" if self.script else "peftlab"

    def plan_entry(self) -> dict:
        return {
            "cell": self.id, "config": self.config, "seed": self.seed, "kind": self.kind,
            "recipe": self.recipe, "recipe_hash": self.recipe_hash, "method": self.method,
            "quantization": self.quantization, "backbone": self.backbone, "compare_to": self.compare_to,
            **({"script": self.script} if self.script else {}),
        }


@dataclass
class BenchPlan:
    spec: Spec
    spec_path: Path
    profile: str  # "full" or "quick"
    name: str
    spec_hash: str
    cells: list[Cell]
    results_dir: Path
    work_dir: Path
    command: str  # how to reproduce the report


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _yaml_value(v: Any) -> str:
    """A value as it must appear on the right of ``key=value`` (parsed back with yaml.safe_load)."""
    if isinstance(v, str):
        return v if yaml.safe_load(v) == v and "\n" not in v else json.dumps(v)
    return json.dumps(v)


def _expand_entry(spec: Spec, entry: ConfigEntry) -> list[tuple[str, list[str], dict]]:
    """(label, overrides, axes) for each configuration an entry stands for."""
    axes: list[tuple[str, list[Any]]] = []
    if spec.backbones:
        axes.append(("backbone.name", list(spec.backbones)))
    if entry.quantization is not None:
        q = [entry.quantization] if isinstance(entry.quantization, str) else list(entry.quantization)
        axes.append(("backbone.quantization", q))
    axes += [(k, list(v)) for k, v in entry.grid.items()]
    out = []
    for draw, drawn in _draws(spec, entry):
        for values in itertools.product(*[vals for _, vals in axes]) if axes else [()]:
            label = entry.name + (f"-{draw:03d}" if draw is not None else "")
            overrides = [f"{k}={_yaml_value(v)}" for k, v in drawn.items()]
            out.append(_grid_point(label, axes, values, overrides, dict(drawn)))
    return out


def _draws(spec: Spec, entry: ConfigEntry) -> list[tuple[Optional[int], dict]]:
    """(index, values) of each draw from the entry's ``sample`` (one empty draw without one). Seeded by
    the spec's sample_seed and the entry's name: the same spec always draws the same configurations."""
    if not entry.sample:
        return [(None, {})]
    rng = random.Random(f"{spec.sample_seed}:{entry.name}")
    return [(i, {k: d.draw(rng) for k, d in entry.sample.items()}) for i in range(entry.samples or 0)]


def _grid_point(label: str, axes: list, values: tuple, overrides: list[str], chosen: dict) -> tuple[str, list[str], dict]:
    """One combination of the grid axes added to a draw: its label, overrides and axis values."""
    for (key, vals), v in zip(axes, values):
        overrides.append(f"{key}={_yaml_value(v)}")
        chosen[key] = v
        if len(vals) > 1:
            short = Path(str(v)).name if key == "backbone.name" else str(v)
            label += f"-{key.rsplit('.', 1)[-1]}={short}" if key not in ("backbone.quantization",) else f"-{v}"
    return label, overrides, chosen


def _cell_id(label: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", f"{label}-s{seed}")


def _matches(name: str, patterns: Optional[list[str]]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def _cell_matches(cell: Cell, patterns: Optional[list[str]]) -> bool:
    """A cell is selected by a glob on its configuration name or on its id (e.g. ``lora`` or ``lora-s43``)."""
    return _matches(cell.config, patterns) or _matches(cell.id, patterns)


def plan_bench(
    spec_path: Union[str, os.PathLike],
    quick: bool = False,
    results_dir: Optional[Union[str, os.PathLike]] = None,
    work_dir: Optional[Union[str, os.PathLike]] = None,
    profile_name: Optional[str] = None,
    verb: str = "bench",
) -> BenchPlan:
    """Resolve a spec into its cells (nothing is run or written). ``quick`` is the profile 'quick'
    (results under work/, for CI); another profile's results go to results/<name>-<profile>."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    if quick and profile_name:
        raise PeftlabError("command line: --quick and --profile: choose one")
    profile_name = "quick" if quick else profile_name
    profile = _profile(spec, spec_path, profile_name)
    name = (spec.name or spec_path.stem) + (f"-{profile_name}" if profile_name else "")
    base = spec_path.parent
    results = Path(results_dir) if results_dir else (
        Path(spec.results) if spec.results and not profile_name else
        (base / "work" / name / "results" if quick else base / "results" / name)
    )
    work = Path(work_dir) if work_dir else (Path(spec.work) if spec.work and not profile_name else base / "work" / name)

    common = list(DEFAULT_OVERRIDES) + [f"data.{k}={_yaml_value(v)}" for k, v in spec.data.items()]
    common += list(spec.overrides)
    cells: list[Cell] = []
    rounds: dict[str, int] = {}  # cell id -> its seed's position in its configuration's seeds
    for entry in spec.methods:
        for label, axis_overrides, axes in _expand_entry(spec, entry):
            if profile is not None and profile.methods is not None and not (
                _matches(label, profile.methods) or _matches(entry.name, profile.methods)
            ):
                continue
            overrides = list(common)
            if entry.method is not None:
                overrides.append(f"method={json.dumps(entry.method)}")
            overrides += [f"data.{k}={_yaml_value(v)}" for k, v in entry.data.items()]
            overrides += list(entry.overrides) + axis_overrides
            if profile is not None:
                overrides += [f"data.{k}={_yaml_value(v)}" for k, v in profile.data.items()]
                overrides += list(profile.overrides)
            seeds = entry.seeds or (profile.seeds if profile is not None else None) or spec.seeds
            timeout = (profile.timeout_s if profile is not None else None) or entry.timeout_s or spec.timeout_s
            recipe = entry.recipe or spec.recipe
            for round_, seed in enumerate(seeds):
                cell = Cell(
                    id=_cell_id(label, seed), config=label, seed=seed, order=len(cells), recipe=recipe,
                    overrides=overrides + [f"train.seed={seed}"], script=entry.script,
                    env={**spec.env, **entry.env}, timeout_s=timeout, compare_to=entry.compare_to, axes=axes,
                    backbone=axes.get("backbone.name"), quantization=axes.get("backbone.quantization", "none"),
                    method=(entry.method or {}).get("name"),
                )
                _resolve_cell(cell, f"{spec_path}: methods: '{entry.name}'")
                cells.append(cell)
                rounds[cell.id] = round_
    if not cells:
        raise PeftlabError(f"{spec_path}: the spec (profile {profile_name or 'full'}) has no cells")
    if ((profile.order if profile is not None else None) or spec.order) == "seed":
        cells.sort(key=lambda c: rounds[c.id])  # stable: configurations keep their order in each round
        for i, cell in enumerate(cells):
            cell.order = i
    ids = [c.id for c in cells]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PeftlabError(f"{spec_path}: two cells would share the id '{dup[0]}'; rename a configuration")
    spec_dump = spec.model_dump(mode="json")
    spec_hash = _hash({"spec": spec_dump, "profile": profile_name or "full"})
    command = f"peftlab {verb} {spec_path}" + (" --quick" if quick else f" --profile {profile_name}" if profile_name else "")
    if results_dir:
        command += f" --results {results_dir}"
    if work_dir:
        command += f" --work {work_dir}"
    return BenchPlan(spec, spec_path, profile_name or "full", name, spec_hash, cells, results, work, command)


def _profile(spec: Any, spec_path: Path, name: Optional[str]) -> Any:
    if name is None:
        return None
    if name == "quick":
        if spec.quick is None:
            raise PeftlabError(f"{spec_path}: quick: --quick needs a `quick:` section in the spec")
        return spec.quick
    if name not in spec.profiles:
        have = ", ".join(sorted(spec.profiles)) or "none"
        raise PeftlabError(f"{spec_path}: profiles: no profile '{name}' (the spec has: {have})")
    return spec.profiles[name]


def _resolve_cell(cell: Cell, where: str) -> None:
    """Read the cell's recipe and overrides (no method validation: the child does that) and hash them.
    A bad override is the spec's error (``where`` names the configuration); a missing recipe is the
    cell's problem, recorded as a failed cell."""
    try:
        if cell.script is not None and not Path(cell.script).is_file():
            raise PeftlabError(f"{cell.script}: baseline script not found (paths are relative to the current folder)")
        path = Path(cell.recipe)
        if not path.is_file():
            raise PeftlabError(f"{path}: recipe file not found (paths are relative to the current folder)")
        data, _text = read_yaml(path)
    except PeftlabError as exc:
        cell.problem = str(exc)
        cell.recipe_hash = _hash({"problem": cell.problem, "overrides": cell.overrides})
        return
    try:
        data = apply_overrides(copy.deepcopy(data), list(cell.overrides))
    except PeftlabError as exc:
        raise PeftlabError(f"{where}: {str(exc).removeprefix('command line: ')}") from None
    hashed = {k: v for k, v in data.items() if k not in ("description", "output")}
    if cell.script is not None:
        hashed["__script__"] = {"path": cell.script, "sha": _file_hash(Path(cell.script))}
    cell.recipe_hash = _hash(hashed)
    method = data.get("method")
    if isinstance(method, str):
        method = {"name": method}
    method = method if isinstance(method, dict) else {}
    cell.method = method.get("name")
    cell.method_options = {k: v for k, v in method.items() if k != "name"}
    backbone = data.get("backbone") if isinstance(data.get("backbone"), dict) else {}
    cell.backbone = backbone.get("name")
    cell.quantization = backbone.get("quantization", "none") or "none"
    cell.task = data.get("task")
