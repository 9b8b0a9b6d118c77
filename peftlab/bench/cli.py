"""The ``bench``, ``sweep`` and ``report`` subcommands."""

from __future__ import annotations

import argparse

from .report import write_report
from .runner import local_executor, run_bench


def _cores(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of CPU cores, at least 1; got {text!r}")
    return int(text)


def _cell_arguments(b) -> None:
    """What ``bench`` and ``sweep`` share: which cells, where results go."""
    b.add_argument("spec", help="benchmarks/<name>.yaml")
    b.add_argument("--quick", action="store_true", help="the spec's quick profile (few steps, one seed; CI)")
    b.add_argument("--profile", metavar="NAME", help="one of the spec's named profiles (e.g. gpu)")
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
    b.add_argument("--allow-dirty", action="store_true",
                   help="record cells into benchmarks/results/ with uncommitted code changes (marked in the report)")


def _ray_arguments(b) -> None:
    b.add_argument("--address", metavar="HOST:PORT", help="an existing Ray cluster (default: start Ray on this machine)")
    b.add_argument("--cpus-per-cell", type=_cores, metavar="N",
                   help="CPU cores (threads) per cell, with either executor (default: all of this machine's)")
    b.add_argument("--gpus-per-cell", type=float, default=0, metavar="N", help="GPUs per cell (default 0)")


def add_commands(sub, command) -> None:
    b = sub.add_parser("bench")
    _cell_arguments(b)
    b.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one cell after the other here (default); ray: cells as Ray tasks ('.[ray]')")
    _ray_arguments(b)
    s = sub.add_parser("sweep")
    _cell_arguments(s)
    _ray_arguments(s)

    r = sub.add_parser("report")
    r.add_argument("results", help="RESULTS.jsonl")
    r.add_argument("--out", metavar="DIR", help="output folder (default: the JSONL's folder)")

    def _run(args, executor) -> int:
        summary = run_bench(
            args.spec, quick=args.quick, only=args.only, rerun=args.rerun, resume=args.resume, skip_failed=args.skip_failed,
            keep_changed=args.keep_changed, results_dir=args.results, work_dir=args.work,
            allow_dirty=args.allow_dirty, profile=args.profile, list_only=args.list, report=not args.no_report,
            executor=executor,
        )
        return 1 if summary.failed else 0

    @command("bench")
    def _bench(args) -> int:
        from .on_ray import ray_executor

        executor = (ray_executor(args.address, args.cpus_per_cell, args.gpus_per_cell) if args.executor == "ray"
                    else local_executor(args.cpus_per_cell))
        return _run(args, executor)

    @command("sweep")
    def _sweep(args) -> int:
        from .on_ray import tune_executor

        return _run(args, tune_executor(args.address, args.cpus_per_cell, args.gpus_per_cell))

    @command("report")
    def _report(args) -> int:
        paths = write_report(args.results, args.out)
        for kind, path in paths.items():
            if path:
                print(f"{kind}: {path}")
        return 0
