"""``peftlab bench SPEC``: run every cell that has no finished record, one process per cell."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO, Union

from ..atomicio import write_json, write_text
from ..checkpoint import latest_checkpoint
from ..errors import PeftlabError
from ..system import machine_info
from ..util import read_json_or_none
from .plan import BenchPlan, Cell, _cell_matches, plan_bench
from .provenance import git_info, versions
from .records import CELL_PLAN_FILE, PLAN_FILE, RESULTS_FILE, build_record, last_error_line, read_records, write_records
from .report import write_report

CELL_FILE = "cell.json"
LOCK_FILE = ".bench.lock"
CHILD_ENV = {
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
HEARTBEAT_S = 300.0
# (plan, cells to run, cells to run from scratch, records so far, provenance, resume, say) -> (cell, record) as each ends
Executor = Callable[..., Iterator[tuple["Cell", dict]]]
PLAN_TIMEOUT_S = 900


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


def _select(plan: BenchPlan, records: dict, summary: BenchSummary, only: Optional[list[str]],
            rerun: Optional[list[str]], skip_failed: bool, keep_changed: bool) -> tuple[list[Cell], list[str], list[str]]:
    """(cells to run, finished cells whose recipe changed, finished cells to re-run); skipped ones go to summary."""
    todo, changed, again = [], [], []
    for cell in plan.cells:
        rec = records.get(cell.id)
        selected = _cell_matches(cell, only)
        if rerun and selected and _cell_matches(cell, rerun):
            again.append(cell.id)
            todo.append(cell)
            continue
        if rec is not None and rec.get("status") in FINISHED:
            if rec.get("recipe_hash") == cell.recipe_hash or keep_changed:
                summary.skipped.append(cell.id)
                continue
            changed.append(cell.id)
        elif rec is not None and skip_failed:
            summary.skipped.append(cell.id)
            continue
        if selected:
            todo.append(cell)
    return todo, changed, again


FINISHED = ("ok", "stopped")  # statuses a re-run keeps ("stopped": ended early by a sweep's early stopping)


def _run_cells(plan: BenchPlan, todo: list[Cell], again: list[str], records: dict, summary: BenchSummary,
               resume: bool, say, executor: Optional[Executor] = None) -> None:
    """Run the selected cells with ``executor`` (default: one after the other, here), recording each as
    soon as it ends."""
    ctx = {"versions": versions(), "git": git_info(), "machine": machine_info()}
    t_start = time.time()
    for cell, rec in (executor or run_locally)(plan, todo, again, records, ctx, resume, say):
        _keep(plan, cell, rec, records, summary, say)
    if todo:
        say(f"ran {len(summary.ran)} cell(s) in {_fmt_duration(time.time() - t_start)}"
            f"{f', {len(summary.failed)} failed' if summary.failed else ''}"
            f"{f'; recorded {len(summary.harvested)} finished run(s) without training' if summary.harvested else ''}")


def run_locally(plan: BenchPlan, todo: list[Cell], again: list[str], records: dict, ctx: dict, resume: bool,
                say) -> Iterator[tuple[Cell, dict]]:
    """The default executor: each cell in its own process on this machine, one after the other."""
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
        yield cell, run_cell(plan, cell, ctx, resume, say, fresh=cell.id in again)


def local_executor(cpus: Optional[int] = None) -> Executor:
    """``run_locally``; with ``cpus`` (``--cpus-per-cell``) every cell keeps to that many CPU threads
    (``PEFTLAB_NUM_THREADS``, as a Ray cell does), so benches started side by side share the cores."""
    if not cpus:
        return run_locally

    def run(*args) -> Iterator[tuple[Cell, dict]]:
        before = os.environ.get("PEFTLAB_NUM_THREADS")
        os.environ["PEFTLAB_NUM_THREADS"] = str(cpus)
        try:
            yield from run_locally(*args)
        finally:
            if before is None:
                os.environ.pop("PEFTLAB_NUM_THREADS", None)
            else:
                os.environ["PEFTLAB_NUM_THREADS"] = before
    return run


def _keep(plan: BenchPlan, cell: Cell, rec: dict, records: dict, summary: BenchSummary, say) -> None:
    """Add a finished cell's record to the summary and to results.jsonl (rewritten whole, atomically)."""
    jsonl = plan.results_dir / RESULTS_FILE
    (summary.harvested if rec.get("harvested") else summary.ran).append(cell.id)
    if rec["status"] not in FINISHED:
        summary.failed.append(cell.id)
    records[cell.id] = rec
    on_disk = [r for r in read_records(jsonl) if r["cell"] != cell.id]
    write_records(jsonl, on_disk + [rec])
    if rec["status"] == "ok":
        main = rec.get("metric")
        val = (rec.get("test") or {}).get(main) if main else None
        mem = (rec.get("memory") or {}).get("peak_rss_bytes")
        say(f"  {cell.id} ok in {_fmt_duration(rec.get('cell_wall_s'))}: test {main} "
            f"{val if val is None else round(val, 4)}, peak RSS "
            f"{'?' if mem is None else round(mem / 2**20)} MiB")
    else:
        say(f"  {cell.id} {'stopped early' if rec['status'] == 'stopped' else 'FAILED'}: {rec.get('error')}")


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
    allow_dirty: bool = False,
    profile: Optional[str] = None,
    executor: Optional[Executor] = None,
    out: TextIO = sys.stderr,
) -> BenchSummary:
    """Run every cell of the spec that has no finished record, then write the report.

    ``only``: run only the cells (or configurations) matching these globs. ``rerun``: also run these
    finished cells again from scratch (after a code change), replacing their records. Cells recorded
    into the repository's own results folder (the default) need a clean tree: a committed report must
    name the commit that reproduces it (``allow_dirty`` records them anyway, marked as such).
    ``executor``: how the cells run (default :func:`run_locally`; see :mod:`peftlab.bench.on_ray`)."""
    verb = getattr(executor, "verb", "bench")  # `peftlab sweep` reproduces a sweep (its early stopping)
    plan = plan_bench(spec_path, quick=quick, results_dir=results_dir, work_dir=work_dir, profile_name=profile, verb=verb)
    summary = BenchSummary(plan)
    jsonl = plan.results_dir / RESULTS_FILE

    def say(msg: str) -> None:
        print(f"[bench] {msg}", file=out, flush=True)

    with _Lock(plan.work_dir / LOCK_FILE):
        records = {r["cell"]: r for r in read_records(jsonl, warn=out)}
        todo, changed, again = _select(plan, records, summary, only, rerun, skip_failed, keep_changed)
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
        if todo and results_dir is None and not allow_dirty:
            _require_clean_tree(plan)
        plan.results_dir.mkdir(parents=True, exist_ok=True)
        write_json(plan.results_dir / PLAN_FILE, {
            "spec": plan.name, "spec_path": str(plan.spec_path), "profile": plan.profile,
            "spec_hash": plan.spec_hash, "description": plan.spec.description, "command": plan.command,
            **({"reference": plan.spec.reference} if plan.spec.reference else {}),
            "cells": [c.plan_entry() for c in plan.cells],
        })
        # a record of an older recipe is neither done nor a guide to the time a cell takes now
        current = {k: r for k, r in records.items() if k not in changed}
        _run_cells(plan, todo, again, current, summary, resume, say, executor)
    if report and jsonl.is_file():
        summary.report = write_report(jsonl, plan.results_dir)
        say(f"report: {summary.report['markdown']}")
    return summary


def _require_clean_tree(plan: BenchPlan) -> None:
    if git_info(plan.spec_path.parent).get("dirty"):
        raise PeftlabError(
            f"{plan.spec_path}: the working tree has uncommitted changes to code that can change a result "
            f"(peftlab/, recipes/, benchmarks/ specs and scripts, the install); commit them so that "
            f"{plan.results_dir}/report.md names a commit that reproduces it, or run with --allow-dirty "
            f"(cells marked 'uncommitted changes') or --results DIR")


def run_cell(plan: BenchPlan, cell: Cell, ctx: dict, resume: bool, say, fresh: bool = False) -> dict:
    """Run the cell in its own process and build its record. ``fresh`` (--rerun): train from scratch,
    never record or resume the run folder left by an earlier run."""
    cell_dir = plan.work_dir / "cells" / cell.id
    run_dir = cell_dir / "run"
    if cell.problem:
        return build_record(plan, cell, ctx, None, status="failed", error=cell.problem)
    if fresh and cell_dir.exists():
        _remove_inside(cell_dir, plan.work_dir)

    # A run that finished but was never recorded (the bench died in between): record it, no training.
    info = read_json_or_none(cell_dir / CELL_FILE)
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
        if plan.spec.predict_memory and not (cell_dir / CELL_PLAN_FILE).is_file():
            _plan_cell(cell, cell_dir, say)
    if resumed:
        cmd.append("--resume")
    write_json(cell_dir / CELL_FILE, {"cell": cell.id, "recipe_hash": cell.recipe_hash,
                                      "overrides": cell.overrides, "command": cmd})
    env = _cell_env(cell)
    started = time.time()
    t0 = time.perf_counter()
    mode = "a" if resumed else "w"
    with open(cell_dir / "stdout.log", mode, encoding="utf-8") as so, open(cell_dir / "stderr.log", mode, encoding="utf-8") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None)
        load: list[float] = []
        status, rusage, timed_out = _wait(proc, cell.timeout_s, heartbeat=lambda el: say(
            f"  ... {cell.id} running for {_fmt_duration(el)}: {_last_progress(cell_dir)}"), load=load)
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


def _cell_env(cell: Cell) -> dict:
    """A cell process's environment. When the cell has a core budget (``PEFTLAB_NUM_THREADS``, set by
    ``--cpus-per-cell`` or the caller), OpenMP gets it too, so a baseline script that leaves torch's
    threads alone keeps to it as peftlab's runs do; the spec's own ``env`` comes last."""
    env = {**os.environ, **CHILD_ENV}
    if env.get("PEFTLAB_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = env["PEFTLAB_NUM_THREADS"]
    return {**env, **cell.env}


def _plan_cell(cell: Cell, cell_dir: Path, say) -> None:
    """The planner's prediction for the cell (``peftlab plan --json``), recorded beside what the cell
    measures; the cell runs whatever the planner says."""
    cmd = [sys.executable, "-m", "peftlab.cli", "plan", cell.recipe, *cell.overrides, "--json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env=_cell_env(cell), timeout=PLAN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        say(f"  plan: gave up after {PLAN_TIMEOUT_S} s")
        return
    if done.returncode in (0, 1):  # 1: does not fit the memory available; still a prediction
        write_text(cell_dir / CELL_PLAN_FILE, done.stdout)
    else:
        say(f"  plan: {last_error_line(done.stderr) or f'exit status {done.returncode}'}")


def _last_progress(cell_dir: Path) -> str:
    """The child's latest log or progress-bar line (for the heartbeat), from whichever of its stdout
    and stderr was written last (a Trainer script prints its losses to stdout). Indented lines are
    skipped: they are the source line Python's warnings print under the warning."""
    logs = [p for p in (cell_dir / "stdout.log", cell_dir / "stderr.log") if p.is_file() and p.stat().st_size]
    for path in sorted(logs, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - 4096))
                tail = fh.read().decode("utf-8", errors="replace")
        except OSError:
            continue
        parts = [p.strip() for chunk in tail.splitlines() for p in chunk.split("\r")
                 if p.strip() and not p[:1].isspace()]
        if parts:
            return parts[-1][:160]
    return ""


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
