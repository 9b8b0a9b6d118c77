"""Benchmarks: a spec (``benchmarks/<name>.yaml``) lists configurations and seeds; every
(configuration, seed) pair is a *cell*, run in its own process::

    python -m peftlab.cli train RECIPE OVERRIDES... train.seed=S output.dir=<work>/cells/<cell>/run

(or a baseline script with the same arguments), so the peak memory a cell reports is that run's
alone; the parent measures the child's peak RSS too (``os.wait4``) as a cross-check.

When a cell ends, one JSON record is written to ``<results>/results.jsonl`` (the whole file is
rewritten atomically). A cell whose record says ``ok`` is skipped on the next run; a failed cell is
retried (``--skip-failed`` keeps it); a cell killed mid-way has no record and is re-run, or continued
from its newest checkpoint with ``--resume``. The report is computed from the records alone.

    spec.py        the spec schema and loader     plan.py     spec -> cells
    runner.py      running cells, the lock        records.py  results.jsonl, one record per cell
    provenance.py  versions, git commit           report.py   report.md / report.csv
    summary.py     statistics over the records    plots.py    the report's plots
    cli.py         `peftlab bench`, `peftlab report`
"""

from ..system import machine_info
from .plan import plan_bench
from .provenance import git_info, versions
from .records import read_records
from .report import write_report
from .runner import run_bench

__all__ = ["git_info", "machine_info", "plan_bench", "read_records", "run_bench", "versions", "write_report"]
