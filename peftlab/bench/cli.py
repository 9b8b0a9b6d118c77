"""The ``bench`` and ``report`` subcommands."""

from __future__ import annotations

from .report import write_report
from .runner import run_bench


def add_commands(sub, command) -> None:
    b = sub.add_parser("bench")
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

    r = sub.add_parser("report")
    r.add_argument("results", help="RESULTS.jsonl")
    r.add_argument("--out", metavar="DIR", help="output folder (default: the JSONL's folder)")

    @command("bench")
    def _bench(args) -> int:
        summary = run_bench(
            args.spec, quick=args.quick, only=args.only, rerun=args.rerun, resume=args.resume, skip_failed=args.skip_failed,
            keep_changed=args.keep_changed, results_dir=args.results, work_dir=args.work,
            allow_dirty=args.allow_dirty, profile=args.profile, list_only=args.list, report=not args.no_report,
        )
        return 1 if summary.failed else 0

    @command("report")
    def _report(args) -> int:
        paths = write_report(args.results, args.out)
        for kind, path in paths.items():
            if path:
                print(f"{kind}: {path}")
        return 0
