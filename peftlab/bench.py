"""``peftlab bench SPEC``: run a matrix of recipes, one process per cell, and record every cell.

A benchmark spec (``benchmarks/<name>.yaml``) lists configurations (a recipe by path, plus overrides,
optionally a quantization / backbone / key grid axis) and seeds. Every (configuration, seed) pair is a
*cell*. Each cell runs in its own process::

    python -m peftlab.cli train RECIPE OVERRIDES... train.seed=S output.dir=<work>/cells/<cell>/run

(or a baseline script with the same arguments), so the peak memory a cell reports is that run's
alone. The parent measures the child's peak RSS too (``os.wait4``) as a cross-check.

When a cell ends, one JSON record is written to ``<results>/results.jsonl`` (the whole file is
rewritten atomically, so a half-written line is never read as a record). A cell whose record says
``ok`` is finished and is skipped on the next run; a cell that failed is recorded with its error
and retried on the next run (``--skip-failed`` keeps it). A cell killed mid-way has no record: it
is re-run from scratch, or continued from its newest checkpoint with ``--resume``. The report
(:mod:`peftlab.report`) is written at the end.

The spec format is documented in ``benchmarks/README.md`` and by :class:`Spec` below.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import fnmatch
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .atomicio import write_json, write_text
from .errors import PeftlabError

SCHEMA_VERSION = 1
RESULTS_FILE = "results.jsonl"
PLAN_FILE = "plan.json"
CELL_FILE = "cell.json"
LOCK_FILE = ".bench.lock"
VERSION_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "peftlab")
CHILD_ENV = {
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
DEFAULT_OVERRIDES = ["train.trackers=none"]  # logging to TensorBoard is not part of what is measured


# ------------------------------------------------------------------------------------------ spec


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
    """A named variant of the spec (``--quick``): its keys replace or extend the spec's."""

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


def _node_line(text: str, loc: tuple) -> Optional[int]:
    """1-based line of the YAML node at ``loc`` (mapping keys and sequence indexes)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _spec_error(err: ValidationError, path: Path, text: str) -> str:
    import difflib

    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = _node_line(text, loc)
    where = f"{path}:{line}" if line else str(path)
    if e["type"] == "extra_forbidden":
        model = {"methods": ConfigEntry, "quick": Profile}.get(str(loc[0]), Spec) if len(loc) > 1 else Spec
        valid = list(model.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{where}: {key}: unknown key{hint}; valid keys here: {', '.join(valid)}"
    if e["type"] == "missing":
        return f"{where}: {key}: required key is missing"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    return f"{where}: {key}: {msg}" + ("" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})")


def load_spec(path: Union[str, os.PathLike]) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"{path}: benchmark spec not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise PeftlabError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise PeftlabError(f"{path}: a benchmark spec must be a YAML mapping")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as err:
        raise PeftlabError(_spec_error(err, path, text)) from None
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


def _expand_entry(spec: Spec, entry: ConfigEntry) -> list[tuple[str, list[str], dict]]:
    """(label, overrides, axes) for each configuration an entry stands for."""
    import itertools

    axes: list[tuple[str, list[Any]]] = []
    if spec.backbones:
        axes.append(("backbone.name", list(spec.backbones)))
    if entry.quantization is not None:
        q = [entry.quantization] if isinstance(entry.quantization, str) else list(entry.quantization)
        axes.append(("backbone.quantization", q))
    axes += [(k, list(v)) for k, v in entry.grid.items()]
    out = []
    for values in itertools.product(*[vals for _, vals in axes]) if axes else [()]:
        label = entry.name
        overrides, chosen = [], {}
        for (key, vals), v in zip(axes, values):
            overrides.append(f"{key}={_yaml_value(v)}")
            chosen[key] = v
            if len(vals) > 1:
                short = Path(str(v)).name if key == "backbone.name" else str(v)
                label += f"-{key.rsplit('.', 1)[-1]}={short}" if key not in ("backbone.quantization",) else f"-{v}"
        out.append((label, overrides, chosen))
    return out


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
) -> BenchPlan:
    """Resolve a spec into its cells (nothing is run or written)."""
    from .recipe import apply_overrides, read_yaml

    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    if quick and spec.quick is None:
        raise PeftlabError(f"{spec_path}: quick: --quick needs a `quick:` section in the spec")
    profile = spec.quick if quick else None
    name = (spec.name or spec_path.stem) + ("-quick" if quick else "")
    base = spec_path.parent
    results = Path(results_dir) if results_dir else (
        Path(spec.results) if spec.results and not quick else
        (base / "work" / name / "results" if quick else base / "results" / name)
    )
    work = Path(work_dir) if work_dir else (Path(spec.work) if spec.work and not quick else base / "work" / name)

    common = list(DEFAULT_OVERRIDES) + [f"data.{k}={_yaml_value(v)}" for k, v in spec.data.items()]
    common += list(spec.overrides)
    cells: list[Cell] = []
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
            for seed in seeds:
                cell = Cell(
                    id=_cell_id(label, seed), config=label, seed=seed, order=len(cells), recipe=recipe,
                    overrides=overrides + [f"train.seed={seed}"], script=entry.script,
                    env={**spec.env, **entry.env}, timeout_s=timeout, compare_to=entry.compare_to, axes=axes,
                    backbone=axes.get("backbone.name"), quantization=axes.get("backbone.quantization", "none"),
                    method=(entry.method or {}).get("name"),
                )
                _resolve_cell(cell, read_yaml, apply_overrides)
                cells.append(cell)
    if not cells:
        raise PeftlabError(f"{spec_path}: the spec (profile {'quick' if quick else 'full'}) has no cells")
    ids = [c.id for c in cells]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise PeftlabError(f"{spec_path}: two cells would share the id '{dup[0]}'; rename a configuration")
    spec_dump = spec.model_dump(mode="json")
    spec_hash = _hash({"spec": spec_dump, "profile": "quick" if quick else "full"})
    command = f"peftlab bench {spec_path}" + (" --quick" if quick else "")
    if results_dir:
        command += f" --results {results_dir}"
    if work_dir:
        command += f" --work {work_dir}"
    return BenchPlan(spec, spec_path, "quick" if quick else "full", name, spec_hash, cells, results, work, command)


def _resolve_cell(cell: Cell, read_yaml, apply_overrides) -> None:
    """Read the cell's recipe and overrides (no method validation: the child does that) and hash them."""
    try:
        if cell.script is not None and not Path(cell.script).is_file():
            raise PeftlabError(f"{cell.script}: baseline script not found (paths are relative to the current folder)")
        path = Path(cell.recipe)
        if not path.is_file():
            raise PeftlabError(f"{path}: recipe file not found (paths are relative to the current folder)")
        data, _text = read_yaml(path)
        data = apply_overrides(copy.deepcopy(data), [o for o in cell.overrides])
    except PeftlabError as exc:
        cell.problem = str(exc)
        cell.recipe_hash = _hash({"problem": cell.problem, "overrides": cell.overrides})
        return
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


# -------------------------------------------------------------------------------- the machine


def versions() -> dict:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


CODE_PATHS = ("peftlab", "recipes", "benchmarks", "pyproject.toml")


def git_info(cwd: Optional[Path] = None) -> dict:
    def git(*args: str) -> Optional[str]:
        try:
            res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # Only what can change a result counts as a change to the code: the package, the recipes, the
    # benchmark specs and scripts, the install. Not the bench's own output (benchmarks/results/,
    # whose records it rewrites), the docs or the tests.
    dirty = git("status", "--porcelain", "--untracked-files=no", "--",
                *(f":(top){p}" for p in CODE_PATHS), ":(top,exclude)benchmarks/results")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


def machine_info() -> dict:
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cpu = cpu or platform.processor() or platform.machine()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) * 1024 / 2**30, 1)
    return {
        "cpu": cpu, "cores": cores, "logical_cpus": os.cpu_count(), "memory_gib": mem,
        "platform": platform.platform(), "gpus": gpu_info(),
    }


def gpu_info() -> list[dict]:
    """GPUs as nvidia-smi lists them (the parent never initialises CUDA itself)."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            res = subprocess.run(
                [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            res = None
        if res is not None and res.returncode == 0:
            gpus = []
            for line in res.stdout.strip().splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) >= 3:
                    with contextlib.suppress(ValueError):
                        gpus.append({"name": parts[0], "memory_gib": round(float(parts[1]) / 1024, 1), "driver": parts[2]})
            return gpus
    return []


# ------------------------------------------------------------------------------------- records


def read_records(path: Union[str, os.PathLike], warn: Optional[TextIO] = None) -> list[dict]:
    """The complete records of a results JSONL. A line that is not a whole JSON object is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_text(encoding="utf-8")
    records = []
    lines = data.split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        complete = i < len(lines)  # the text after the last newline is an unfinished line
        try:
            rec = json.loads(line) if complete else None
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or "cell" not in rec:
            if warn is not None:
                print(f"[bench] {path}:{i}: not a complete record, ignored", file=warn)
            continue
        records.append(rec)
    return records


def write_records(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _scalars(d: Optional[dict], drop: tuple = ()) -> Optional[dict]:
    if not isinstance(d, dict):
        return None
    return {k: v for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in drop}


def last_error_line(text: str) -> str:
    """The line that says why a cell failed: peftlab's one-line error, else the last non-progress line."""
    lines = [ln.strip() for chunk in text.splitlines() for ln in chunk.split("\r")]
    lines = [ln for ln in lines if ln and not re.match(r"^\S*:?\s*\d+%\|", ln) and "it/s]" not in ln and "s/it]" not in ln]
    for ln in reversed(lines):
        if ln.startswith("peftlab: error:"):
            return ln
    return lines[-1] if lines else ""


def build_record(plan: BenchPlan, cell: Cell, ctx: dict, run_dir: Optional[Path], *, status: str,
                 error: Optional[str] = None, returncode: Optional[int] = None,
                 parent_peak: Optional[int] = None, cell_wall: Optional[float] = None,
                 started: Optional[float] = None, resumed: bool = False, harvested: bool = False,
                 command: Optional[list[str]] = None, load: Optional[list[float]] = None) -> dict:
    rec: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "status": status,
        "error": error,
        "cell": cell.id,
        "config": cell.config,
        "seed": cell.seed,
        "kind": cell.kind,
        "compare_to": cell.compare_to,
        "spec": plan.name,
        "spec_path": str(plan.spec_path),
        "profile": plan.profile,
        "spec_hash": plan.spec_hash,
        "recipe": cell.recipe,
        "recipe_hash": cell.recipe_hash,
        "overrides": cell.overrides,
        "script": cell.script,
        "axes": cell.axes,
        "method": cell.method,
        "method_options": cell.method_options,
        "quantization": cell.quantization,
        "backbone": cell.backbone,
        "task": cell.task,
        "bench_command": plan.command,
        "command": command,
        "returncode": returncode,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)) if started else None,
        "cell_wall_s": round(cell_wall, 3) if cell_wall is not None else None,
        "resumed": resumed,
        "harvested": harvested,
        # 1-minute load average of the machine while the cell ran (timings on a busy machine are slower)
        "load_avg": {"mean": round(sum(load) / len(load), 2), "max": round(max(load), 2), "samples": len(load)}
        if load else None,
        "versions": ctx["versions"],
        "git": ctx["git"],
        "machine": ctx["machine"],
    }
    if status != "ok" or run_dir is None:
        return rec
    metrics = _read_json(run_dir / "metrics.json") or {}
    params = _read_json(run_dir / "params.json") or {}
    res = _read_json(run_dir / "resources.json") or {}
    resolved = None
    with contextlib.suppress(OSError, yaml.YAMLError):
        resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    if isinstance(resolved, dict):
        m = resolved.get("method") or {}
        rec["method"] = m.get("name", rec["method"])
        rec["method_options"] = {k: v for k, v in m.items() if k != "name"}
        rec["backbone"] = (resolved.get("backbone") or {}).get("name", rec["backbone"])
        rec["quantization"] = (resolved.get("backbone") or {}).get("quantization", rec["quantization"])
        rec["task"] = resolved.get("task", rec["task"])
        rec["resolved_recipe_hash"] = _hash({k: v for k, v in resolved.items() if k not in ("description", "output")})
        t = resolved.get("train") or {}
        rec["hyperparameters"] = {k: t.get(k) for k in ("lr", "head_lr", "epochs", "max_steps", "batch_size",
                                                         "grad_accum", "warmup_ratio", "scheduler", "weight_decay")}
    rec["metric"] = metrics.get("metric")
    rec["dev"] = _scalars(metrics.get("dev"), drop=("epoch", "step"))
    rec["test"] = _scalars(metrics.get("test"), drop=("examples",))
    rec["best_epoch"] = metrics.get("best_epoch")
    rec["best_step"] = metrics.get("best_step")
    rec["steps"] = metrics.get("steps")
    rec["params"] = {k: params.get(k) for k in (
        "total_params", "backbone_params", "head_params", "trainable_params", "trainable_pct",
        "trainable_head_params", "trainable_params_without_head", "trainable_pct_without_head",
        "method_added_params")}
    # peft's own count (get_nb_trainable_parameters of the peft model) where the method builds one
    rec["params"]["peft_trainable_params"] = (params.get("peft_count") or {}).get("trainable")
    rec["size"] = {"model_dir_bytes": params.get("model_dir_bytes")}
    rec["memory"] = {
        "peak_rss_bytes": res.get("peak_rss_bytes"),
        "parent_peak_rss_bytes": parent_peak,
        "load_rss_bytes": res.get("load_rss_bytes"),
        "load_peak_rss_bytes": res.get("load_peak_rss_bytes"),
        "cuda_max_memory_allocated_bytes": res.get("cuda_max_memory_allocated_bytes"),
        "cuda_max_memory_reserved_bytes": res.get("cuda_max_memory_reserved_bytes"),
    }
    rec["time"] = {k: res.get(k) for k in (
        "train_time_s", "eval_time_s", "wall_time_s", "samples_per_s", "tokens_per_s", "train_samples",
        "train_tokens", "optimizer_steps", "processes", "threads_per_process", "device")}
    return rec


# ---------------------------------------------------------------------------------- running


@dataclass
class BenchSummary:
    plan: BenchPlan
    ran: list[str] = field(default_factory=list)  # cells launched in this invocation
    harvested: list[str] = field(default_factory=list)  # finished runs recorded without training
    skipped: list[str] = field(default_factory=list)  # already recorded
    failed: list[str] = field(default_factory=list)  # failed in this invocation
    report: Optional[dict] = None

    @property
    def results_path(self) -> Path:
        return self.plan.results_dir / RESULTS_FILE


def _set_pdeathsig() -> None:  # runs in the child before exec: die with the bench
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _fmt_duration(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _estimate(cell: Cell, records: dict[str, dict]) -> Optional[float]:
    same = [r["cell_wall_s"] for r in records.values()
            if r.get("config") == cell.config and r.get("status") == "ok" and r.get("cell_wall_s")]
    if same:
        return sum(same) / len(same)
    every = [r["cell_wall_s"] for r in records.values() if r.get("status") == "ok" and r.get("cell_wall_s")]
    return sum(every) / len(every) if every else None


def _checkpoint_exists(cell: Cell, run_dir: Path) -> bool:
    if cell.script:
        return any(p.is_dir() for p in (run_dir / "trainer").glob("checkpoint-*"))
    from .checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoints") is not None


class _Lock:
    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise PeftlabError(f"{self.path}: another `peftlab bench` is running on this benchmark") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def run_bench(
    spec_path: Union[str, os.PathLike],
    *,
    quick: bool = False,
    only: Optional[list[str]] = None,
    rerun: Optional[list[str]] = None,
    resume: bool = False,
    skip_failed: bool = False,
    keep_changed: bool = False,
    results_dir: Optional[Union[str, os.PathLike]] = None,
    work_dir: Optional[Union[str, os.PathLike]] = None,
    list_only: bool = False,
    report: bool = True,
    out: TextIO = sys.stderr,
) -> BenchSummary:
    """Run every cell of the spec that has no finished record, then write the report.

    ``only``: run only the cells (or configurations) matching these globs. ``rerun``: also run these
    finished cells again from scratch (after a code change), replacing their records."""
    plan = plan_bench(spec_path, quick=quick, results_dir=results_dir, work_dir=work_dir)
    summary = BenchSummary(plan)
    jsonl = plan.results_dir / RESULTS_FILE

    def say(msg: str) -> None:
        print(f"[bench] {msg}", file=out, flush=True)

    with _Lock(plan.work_dir / LOCK_FILE):
        records = {r["cell"]: r for r in read_records(jsonl, warn=out)}
        todo, changed, again = [], [], []
        for cell in plan.cells:
            rec = records.get(cell.id)
            selected = _cell_matches(cell, only)
            if rerun and selected and _cell_matches(cell, rerun):
                again.append(cell.id)
                todo.append(cell)
                continue
            if rec is not None and rec.get("status") == "ok":
                if rec.get("recipe_hash") == cell.recipe_hash or keep_changed:
                    summary.skipped.append(cell.id)
                    continue
                changed.append(cell.id)
            elif rec is not None and skip_failed:
                summary.skipped.append(cell.id)
                continue
            if selected:
                todo.append(cell)
        n_ok = sum(1 for c in plan.cells if records.get(c.id, {}).get("status") == "ok"
                   and c.id not in changed and c.id not in again)
        say(f"{plan.name}: {len(plan.cells)} cells ({plan.profile} profile), {n_ok} finished, "
            f"{len(todo)} to run now; results: {jsonl}")
        if changed:
            say(f"{len(changed)} finished cell(s) were recorded with a different recipe/overrides than the spec "
                f"gives now and will run again ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); "
                f"--keep-changed keeps their records")
        if again:
            say(f"--rerun: {len(again)} cell(s) will run again from scratch, replacing their records "
                f"({', '.join(again[:5])}{', ...' if len(again) > 5 else ''})")
        if list_only:
            for cell in plan.cells:
                rec = records.get(cell.id)
                state = "to run" if cell in todo else (rec.get("status") if rec else "not selected")
                say(f"  {cell.id:<40} {state}{'  (' + cell.problem + ')' if cell.problem else ''}")
            return summary
        plan.results_dir.mkdir(parents=True, exist_ok=True)
        write_json(plan.results_dir / PLAN_FILE, {
            "spec": plan.name, "spec_path": str(plan.spec_path), "profile": plan.profile,
            "spec_hash": plan.spec_hash, "description": plan.spec.description, "command": plan.command,
            **({"reference": plan.spec.reference} if plan.spec.reference else {}),
            "cells": [c.plan_entry() for c in plan.cells],
        })
        ctx = {"versions": versions(), "git": git_info(), "machine": machine_info()}
        t_start = time.time()
        for i, cell in enumerate(todo):
            left = todo[i:]
            eta = [_estimate(c, records) for c in left]
            known = [e for e in eta if e is not None]
            eta_txt = _fmt_duration(sum(known) * len(left) / len(known)) if known else "? (after the first cell)"
            # a cell still to run in this run (re-run, changed recipe, failed before) is not done yet
            pending = {c.id for c in left}
            finished = [records.get(c.id, {}).get("status") for c in plan.cells if c.id not in pending]
            done, failed = finished.count("ok"), finished.count("failed")
            say(f"[{done}/{len(plan.cells)} done{f', {failed} failed' if failed else ''}; this run: "
                f"{i}/{len(todo)} done, {len(left)} left, ETA {eta_txt}] cell {cell.id}")
            rec = _run_or_harvest(plan, cell, ctx, resume, say, fresh=cell.id in again)
            if rec.get("harvested"):
                summary.harvested.append(cell.id)
            else:
                summary.ran.append(cell.id)
            if rec["status"] != "ok":
                summary.failed.append(cell.id)
            records[cell.id] = rec
            on_disk = [r for r in read_records(jsonl) if r["cell"] != cell.id]
            write_records(jsonl, on_disk + [rec])
            if rec["status"] == "ok":
                main = rec.get("metric")
                val = (rec.get("test") or {}).get(main) if main else None
                mem = (rec.get("memory") or {}).get("peak_rss_bytes")
                say(f"  ok in {_fmt_duration(rec.get('cell_wall_s'))}: test {main} "
                    f"{val if val is None else round(val, 4)}, peak RSS "
                    f"{'?' if mem is None else round(mem / 2**20)} MiB")
            else:
                say(f"  FAILED: {rec.get('error')}")
        if todo:
            say(f"ran {len(summary.ran)} cell(s) in {_fmt_duration(time.time() - t_start)}"
                f"{f', {len(summary.failed)} failed' if summary.failed else ''}"
                f"{f'; recorded {len(summary.harvested)} finished run(s) without training' if summary.harvested else ''}")
    if report and jsonl.is_file():
        from .report import write_report

        summary.report = write_report(jsonl, plan.results_dir)
        say(f"report: {summary.report['markdown']}")
    return summary


def _run_or_harvest(plan: BenchPlan, cell: Cell, ctx: dict, resume: bool, say, fresh: bool = False) -> dict:
    """Run the cell in its own process and build its record. ``fresh`` (--rerun): train from scratch,
    never record or resume the run folder left by an earlier run."""
    cell_dir = plan.work_dir / "cells" / cell.id
    run_dir = cell_dir / "run"
    if cell.problem:
        return build_record(plan, cell, ctx, None, status="failed", error=cell.problem)
    if fresh and cell_dir.exists():
        _remove_inside(cell_dir, plan.work_dir)

    # A run that finished but was never recorded (the bench died in between): record it, no training.
    info = _read_json(cell_dir / CELL_FILE)
    if (info is not None and info.get("recipe_hash") == cell.recipe_hash
            and info.get("overrides") == cell.overrides and (run_dir / "metrics.json").is_file()):
        say("  finished earlier but not recorded: recording it from its run folder (no training)")
        return build_record(plan, cell, ctx, run_dir, status="ok", harvested=True,
                            cell_wall=info.get("cell_wall_s"), command=info.get("command"))

    resumed = False
    if cell_dir.exists():
        same = info is not None and info.get("recipe_hash") == cell.recipe_hash
        if resume and same and _checkpoint_exists(cell, run_dir):
            resumed = True
            say(f"  resuming from the checkpoint in {run_dir}")
        else:
            if resume:
                say("  --resume: no usable checkpoint for this cell; running it from scratch")
            _remove_inside(cell_dir, plan.work_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    if cell.script:
        cmd = [sys.executable, cell.script, cell.recipe, *cell.overrides, f"output.dir={run_dir}"]
    else:
        cmd = [sys.executable, "-m", "peftlab.cli", "train", cell.recipe, *cell.overrides, f"output.dir={run_dir}"]
    if resumed:
        cmd.append("--resume")
    write_json(cell_dir / CELL_FILE, {"cell": cell.id, "recipe_hash": cell.recipe_hash,
                                      "overrides": cell.overrides, "command": cmd})
    env = {**os.environ, **CHILD_ENV, **cell.env}
    started = time.time()
    t0 = time.perf_counter()
    mode = "a" if resumed else "w"
    with open(cell_dir / "stdout.log", mode, encoding="utf-8") as so, open(cell_dir / "stderr.log", mode, encoding="utf-8") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None)
        load: list[float] = []
        status, rusage, timed_out = _wait(proc, cell.timeout_s, heartbeat=lambda el: say(
            f"  ... {cell.id} running for {_fmt_duration(el)}: {_last_progress(cell_dir / 'stderr.log')}"), load=load)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    parent_peak = int(rusage.ru_maxrss) * 1024 if rusage is not None else None
    info = {"cell": cell.id, "recipe_hash": cell.recipe_hash, "overrides": cell.overrides, "command": cmd,
            "returncode": rc, "cell_wall_s": round(wall, 3), "parent_peak_rss_bytes": parent_peak}
    write_json(cell_dir / CELL_FILE, info)
    common = dict(returncode=rc, parent_peak=parent_peak, cell_wall=wall, started=started, resumed=resumed,
                  command=cmd, load=load)
    if timed_out:
        return build_record(plan, cell, ctx, run_dir, status="failed",
                            error=f"timed out after {_fmt_duration(cell.timeout_s)} (timeout_s)", **common)
    if rc != 0:
        err = last_error_line((cell_dir / "stderr.log").read_text(encoding="utf-8", errors="replace"))
        return build_record(plan, cell, ctx, run_dir, status="failed", error=err or f"exit status {rc}", **common)
    if not (run_dir / "metrics.json").is_file():
        return build_record(plan, cell, ctx, run_dir, status="failed",
                            error="the run exited 0 but wrote no metrics.json", **common)
    return build_record(plan, cell, ctx, run_dir, status="ok", **common)


def _last_progress(path: Path) -> str:
    """The child's latest log or progress-bar line (for the heartbeat)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 4096))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    parts = [p.strip() for chunk in tail.splitlines() for p in chunk.split("\r") if p.strip()]
    return parts[-1][:160] if parts else ""


HEARTBEAT_S = 300.0


def _wait(proc: subprocess.Popen, timeout: Optional[float], heartbeat=None, load: Optional[list] = None):
    """Reap the child with wait4 (its own rusage: peak RSS of that process alone).

    ``load`` collects the machine's 1-minute load average every few seconds while the cell runs.
    """
    start = time.monotonic()
    deadline = start + timeout if timeout else None
    next_beat = start + HEARTBEAT_S
    next_load = start
    timed_out = False
    try:
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            now = time.monotonic()
            if load is not None and now >= next_load:
                with contextlib.suppress(OSError):
                    load.append(os.getloadavg()[0])
                next_load = now + 5.0
            if deadline and now > deadline:
                timed_out = True
                proc.kill()
                deadline = None
            if heartbeat is not None and now >= next_beat:
                heartbeat(now - start)
                next_beat = now + HEARTBEAT_S
            time.sleep(0.25)
    except BaseException:  # Ctrl-C: stop the child too; the cell stays unrecorded
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)
        proc.returncode = -9
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return status, rusage, timed_out


def _remove_inside(path: Path, root: Path) -> None:
    path, root = path.resolve(), root.resolve()
    if root not in path.parents:
        raise PeftlabError(f"refusing to delete {path}: not inside the work folder {root}")
    shutil.rmtree(path)


# ------------------------------------------------------------------------------------- the CLI


def add_commands(sub, command) -> None:
    b = sub.add_parser("bench", help="run a benchmark spec: one process per cell, results as JSONL + report")
    b.add_argument("spec", help="benchmarks/<name>.yaml")
    b.add_argument("--quick", action="store_true", help="the spec's quick profile (few steps, one seed; CI)")
    b.add_argument("--only", action="append", metavar="PATTERN",
                   help="run only configurations/cells matching this glob (repeatable)")
    b.add_argument("--rerun", action="append", metavar="PATTERN",
                   help="also run finished configurations/cells matching this glob again from scratch, "
                        "replacing their records, e.g. after a code change (repeatable)")
    b.add_argument("--resume", action="store_true", help="continue a cell killed mid-way from its checkpoint")
    b.add_argument("--skip-failed", action="store_true", help="do not retry cells recorded as failed")
    b.add_argument("--keep-changed", action="store_true",
                   help="keep records whose recipe/overrides differ from what the spec gives now")
    b.add_argument("--results", metavar="DIR", help="results folder (default: benchmarks/results/<name>)")
    b.add_argument("--work", metavar="DIR", help="cell work folder (default: benchmarks/work/<name>)")
    b.add_argument("--list", action="store_true", help="list the cells and their state; run nothing")
    b.add_argument("--no-report", action="store_true", help="do not write the report at the end")

    r = sub.add_parser("report", help="Markdown/CSV/PNG report of a bench's results JSONL")
    r.add_argument("results", help="RESULTS.jsonl")
    r.add_argument("--out", metavar="DIR", help="output folder (default: the JSONL's folder)")

    @command("bench")
    def _bench(args) -> int:
        summary = run_bench(
            args.spec, quick=args.quick, only=args.only, rerun=args.rerun, resume=args.resume, skip_failed=args.skip_failed,
            keep_changed=args.keep_changed, results_dir=args.results, work_dir=args.work,
            list_only=args.list, report=not args.no_report,
        )
        return 1 if summary.failed else 0

    @command("report")
    def _report(args) -> int:
        from .report import write_report

        paths = write_report(args.results, args.out)
        for kind, path in paths.items():
            if path:
                print(f"{kind}: {path}")
        return 0
