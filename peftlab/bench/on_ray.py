"""Bench cells and sweep trials on Ray (the optional ``[ray]`` extra).

* ``peftlab bench SPEC --executor ray``: every cell is a Ray task with its resources (CPU cores,
  GPUs), as many at once as the cluster holds.
* ``peftlab sweep SPEC``: every cell is a Ray Tune trial; with the spec's ``early_stopping``, Tune's
  ASHA scheduler ends the trials whose dev metric trails the others' at the same evaluation.

Either way a cell is run by :func:`peftlab.bench.runner.run_cell` (its own process, command, record
and peak memory, as with the local executor) and recorded by the bench as it ends. Without
``address`` Ray starts on this machine; with it, the cells go to that cluster, whose nodes must see
the repository, the data and the work folder at the same paths (one machine or a shared filesystem).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ..atomicio import write_json
from ..errors import PeftlabError
from ..runs import EVALUATIONS_FILE
from ..system import cpu_cores, machine_info
from ..util import read_json_or_none
from .plan import BenchPlan, Cell
from .records import build_record
from .spec import EarlyStopping

RECORD_FILE = "record.json"  # in a trial's cell folder: the record of a trial that ran to its end
POLL_S = 1.0
NEVER = 10**6  # evaluations


def start_ray(address: Optional[str]) -> Any:
    """Ray, connected to ``address`` or started here (this machine's cores), once per process."""
    try:
        import ray
    except ImportError:
        raise PeftlabError("--executor ray / peftlab sweep: Ray is not installed (pip install -e '.[ray]')") from None
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=cpu_cores(), include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PeftlabError(f"--address {address or '(local)'}: Ray did not start or connect: {first}") from None
    return ray


def _in_worker(cwd: str, threads: int) -> None:
    """A Ray worker runs the cell from the driver's folder, with the cores Ray gave it."""
    os.chdir(cwd)
    os.environ["PEFTLAB_NUM_THREADS"] = str(threads)


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _cell_task(plan: BenchPlan, cell: Cell, ctx: dict, resume: bool, fresh: bool, cwd: str, threads: int) -> dict:
    from .runner import run_cell

    _in_worker(cwd, threads)
    return run_cell(plan, cell, {**ctx, "machine": machine_info()}, resume, _say, fresh=fresh)


def ray_executor(address: Optional[str] = None, cpus: Optional[int] = None, gpus: float = 0):
    """``peftlab bench --executor ray``: each cell a Ray task needing ``cpus`` cores (default: all of
    this machine's, so one cell at a time here) and ``gpus`` GPUs."""
    cpus = cpus or cpu_cores()

    def run(plan: BenchPlan, todo: list[Cell], again: list[str], records: dict, ctx: dict, resume: bool,
            say) -> Iterator[tuple[Cell, dict]]:
        ray = start_ray(address)
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_cell_task)
        pending = {task.remote(plan, cell, ctx, resume, cell.id in again, os.getcwd(), cpus): cell for cell in todo}
        say(f"ray: {len(todo)} cell(s) submitted, {cpus} core(s){f' and {gpus:g} GPU(s)' if gpus else ''} each")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(done[0])
            try:
                yield cell, ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - a lost worker or node: the cell failed, the others go on
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                yield cell, build_record(plan, cell, ctx, None, status="failed", error=f"ray: {first}")
    return run


# ------------------------------------------------------------------------------------ sweeps
def read_evaluations(run_dir: Path) -> list[dict]:
    """The run's evaluations so far, one per step (a resumed run repeats those after its checkpoint)."""
    path = run_dir / EVALUATIONS_FILE
    by_step: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written
            if isinstance(entry, dict) and "step" in entry:
                by_step[int(entry["step"])] = entry
    return [by_step[s] for s in sorted(by_step)]


def _score(entry: dict) -> float:
    """The trial's dev metric as one number where higher is better (ASHA compares trials with it)."""
    sel = entry.get("selection") or {}
    value = float(sel.get("value", float("nan")))
    return value if sel.get("mode", "max") == "max" else -value


def _trial(config: dict, plan: BenchPlan, cells: dict, again: list[str], ctx: dict, resume: bool, cwd: str,
           threads: int) -> None:
    """One Tune trial: the cell runs in a thread; each new evaluation is reported to Tune, which may
    end the trial there (ASHA). A trial that runs to its end leaves its record in the cell folder."""
    from ray import tune

    from .runner import run_cell

    _in_worker(cwd, threads)
    cell = cells[config["cell"]]
    cell_dir = plan.work_dir / "cells" / cell.id
    (cell_dir / RECORD_FILE).unlink(missing_ok=True)  # from an earlier sweep of this cell
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(rec=run_cell(
        plan, cell, {**ctx, "machine": machine_info()}, resume, _say, fresh=cell.id in again)), daemon=True)
    worker.start()
    reported = 0
    try:
        while True:
            alive = worker.is_alive()
            evaluations = read_evaluations(cell_dir / "run")
            for entry in evaluations[reported:]:
                reported += 1
                tune.report({"score": _score(entry), "evaluation": reported})
            if not alive:
                break
            time.sleep(POLL_S)
        write_json(cell_dir / RECORD_FILE, out["rec"])
    finally:
        if worker.is_alive():  # stopped by the scheduler: end the cell's process with the trial
            _kill_children()


def _kill_children() -> None:
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if entry.isdigit() and stat.rsplit(")", 1)[-1].split()[1] == me:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stopped_record(plan: BenchPlan, cell: Cell, ctx: dict) -> dict:
    """The record of a trial that early stopping ended: its evaluations and its best dev metric."""
    run_dir = plan.work_dir / "cells" / cell.id / "run"
    evaluations = read_evaluations(run_dir)
    if not evaluations:
        return build_record(plan, cell, ctx, run_dir, status="failed", error="the trial ended before its first evaluation")
    best = max(evaluations, key=_score)
    sel = best["selection"]
    rec = build_record(plan, cell, ctx, run_dir, status="stopped",
                       error=f"stopped by early stopping after {len(evaluations)} evaluation(s); best dev "
                             f"{sel['metric']} {sel['value']:.4f} at step {best['step']}")
    rec.update(metric=sel["metric"], dev={k: v for k, v in best.items() if isinstance(v, (int, float))
                                           and k not in ("epoch", "step")}, evaluations=evaluations)
    return rec


class _Finished:
    """Trials Tune reports finished (completed or stopped), for the driver's generator. A Tune
    callback is pickled with the experiment, so the queue lives on the class, not the instance."""

    queue: "queue.Queue[str]" = queue.Queue()


def _callback() -> Any:
    from ray import tune

    class Finished(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _Finished.queue.put(trial.config["cell"])

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _Finished.queue.put(trial.config["cell"])

    return Finished()


def tune_executor(address: Optional[str] = None, cpus: Optional[int] = None, gpus: float = 0):
    """``peftlab sweep``: each cell a Ray Tune trial; ASHA on the dev metric when the spec has
    ``early_stopping``."""
    cpus = cpus or cpu_cores()

    def run(plan: BenchPlan, todo: list[Cell], again: list[str], records: dict, ctx: dict, resume: bool,
            say) -> Iterator[tuple[Cell, dict]]:
        start_ray(address)
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        cells = {c.id: c for c in todo}
        early: Optional[EarlyStopping] = plan.spec.early_stopping
        # max_t: ASHA ends a trial that reaches it; a run ends by its own schedule, so it is never reached
        scheduler = (ASHAScheduler(time_attr="evaluation", max_t=NEVER, grace_period=early.grace_evaluations,
                                   reduction_factor=early.reduction_factor) if early else FIFOScheduler())
        trainable = tune.with_parameters(_trial, plan=plan, cells=cells, again=again, ctx=ctx, resume=resume,
                                         cwd=os.getcwd(), threads=cpus)
        # Tune's own tables and hints off (verbose=0 silences only its legacy engine): one line per trial
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus, "gpu": gpus}),
            param_space={"cell": tune.grid_search([c.id for c in todo])},
            tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler),
            run_config=tune.RunConfig(storage_path=str((plan.work_dir / "tune").resolve()), name=plan.name,
                                      verbose=0, callbacks=[_callback()]),
        )
        say(f"ray tune: {len(todo)} trial(s), {cpus} core(s){f' and {gpus:g} GPU(s)' if gpus else ''} each, "
            f"{'ASHA early stopping' if early else 'no early stopping'}")
        while not _Finished.queue.empty():  # left by an earlier sweep in this process
            _Finished.queue.get_nowait()
        fitting = threading.Thread(target=tuner.fit, daemon=True)
        fitting.start()
        left = dict(cells)
        while left and (fitting.is_alive() or not _Finished.queue.empty()):
            try:
                cell_id = _Finished.queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            cell = left.pop(cell_id, None)
            if cell is not None:
                rec = read_json_or_none(plan.work_dir / "cells" / cell.id / RECORD_FILE)
                yield cell, rec if isinstance(rec, dict) else _stopped_record(plan, cell, ctx)
        fitting.join()
        for cell in left.values():
            yield cell, build_record(plan, cell, ctx, None, status="failed", error="ray tune: the trial never finished")
    run.verb = "sweep"  # type: ignore[attr-defined]
    return run
