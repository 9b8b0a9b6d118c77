"""The ``merge`` and ``export`` subcommands."""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

from ..errors import PeftlabError
from .combine import DEFAULT_MIN_FRACTION, HOWS, combine
from .export import export
from .merge import DEFAULT_VERIFY_EXAMPLES, DTYPES, EVAL_SPLITS, merge
from .verify import QUANTIZED_BASE_MODES


def add_commands(sub: Any, command: Callable) -> None:
    """Register ``peftlab merge`` and ``peftlab export`` (called by peftlab.cli)."""
    m = sub.add_parser(
        "merge",
        description="Fold the run's method into the backbone's weights and write a checkpoint that "
        "transformers loads without peft/peftlab. The merged model is checked against the run before "
        "anything is written; exit 4 when it does not reproduce it.",
    )
    m.add_argument("run_dir", nargs="?", help="a finished run folder")
    m.add_argument("--out", required=True, help="output folder (written atomically)")
    m.add_argument("--combine", nargs="+", metavar="RUN", help="combine these LoRA runs (one task and backbone) "
                   "into one checkpoint instead, verified on each run's validation data")
    m.add_argument("--how", choices=HOWS, default="linear", help="--combine: peft's combination (default linear)")
    m.add_argument("--weights", nargs="+", type=float, help="--combine: one weight per run (default: equal, sum 1)")
    m.add_argument("--density", type=float, default=0.5, help="--combine: fraction kept by ties/dare (default 0.5)")
    m.add_argument("--min-fraction", type=float, default=DEFAULT_MIN_FRACTION,
                   help="--combine: the combined model's metric on each run's validation data must be at least this "
                        f"fraction of the run's own (default {DEFAULT_MIN_FRACTION})")
    m.add_argument("--accept-loss", action="store_true", help="--combine: write it even below --min-fraction")
    m.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: the run's backbone.dtype)")
    m.add_argument("--verify-examples", type=int, default=DEFAULT_VERIFY_EXAMPLES,
                   help=f"validation examples both models run on (default {DEFAULT_VERIFY_EXAMPLES})")
    m.add_argument("--atol", type=float, default=None,
                   help="max |Δlogit| allowed (default: 1e-4 exact, 0.5 bfloat16, 0.1 float16, not enforced from quantized)")
    m.add_argument("--min-agreement", type=float, default=None,
                   help="minimum prediction agreement, a fraction (default: 1.0 exact, 0.99 dtype change or dequantized, 0.90 reloaded from quantized)")
    m.add_argument("--eval-split", choices=EVAL_SPLITS, default="validation",
                   help="split on which the task metric of both models is reported (default validation)")
    m.add_argument("--quantized-base", choices=QUANTIZED_BASE_MODES, default=QUANTIZED_BASE_MODES[0],
                   help="runs on int8/nf4/fp4 backbones: dequantize the quantized weights the adapter was trained "
                        "against (default; reproduces the run) or reload the original full-precision base")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    command("merge")(_merge_cmd)

    e = sub.add_parser(
        "export",
    )
    e.add_argument("run_dir", help="a finished run folder")
    e.add_argument("--out", required=True, help="output folder (written atomically)")
    e.add_argument("--verify-examples", type=int, default=DEFAULT_VERIFY_EXAMPLES)
    e.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    command("export")(_export_cmd)


def _merge_cmd(args: argparse.Namespace) -> int:
    if args.combine:
        return _combine_cmd(args)
    if args.run_dir is None:
        raise PeftlabError("command line: merge needs a run folder (or --combine RUN RUN ...)")
    report = merge(
        args.run_dir, args.out, dtype=args.dtype, verify_examples=args.verify_examples, atol=args.atol,
        min_agreement=args.min_agreement, eval_split=args.eval_split, quantized_base=args.quantized_base,
        overwrite=args.overwrite,
    )
    line = (f"merged: {args.out} ({report['kind']}, {report['dtype']}): max |Δlogit| "
            f"{report['max_abs_logit_diff']:.3g}, mean {report['mean_abs_logit_diff']:.3g}, agreement "
            f"{100 * report['agreement']:.2f}% on {report['examples']} validation examples")
    m = report.get("metrics")
    if m:
        metric = m["metric"]
        line += (f"; {m['split']} {metric} unmerged {m['unmerged'].get(metric, math.nan):.4f} "
                 f"merged {m['merged'].get(metric, math.nan):.4f}")
    print(line)
    return 0


def _combine_cmd(args: argparse.Namespace) -> int:
    if args.run_dir is not None:
        raise PeftlabError(f"command line: {args.run_dir}: give the runs to combine after --combine only")
    report = combine(args.combine, args.out, how=args.how, weights=args.weights, density=args.density,
                     min_fraction=args.min_fraction, accept_loss=args.accept_loss,
                     verify_examples=args.verify_examples, overwrite=args.overwrite)
    for s in report["sources"]:
        m = s["metric"]
        print(f"combined: {s['run']}: {m} {s['source'].get(m, math.nan):.4f} alone, "
              f"{s['combined'].get(m, math.nan):.4f} combined")
    print(f"combined: {args.out} ({report['how']} of {len(report['runs'])} runs): max |Δlogit| "
          f"{report['max_abs_logit_diff']:.3g} against the combined adapter")
    return 0


def _export_cmd(args: argparse.Namespace) -> int:
    report = export(args.run_dir, args.out, verify_examples=args.verify_examples, overwrite=args.overwrite)
    print(f"exported: {args.out} ({report['method']}; reproduces the run: max |Δlogit| "
          f"{report['max_abs_logit_diff']:.3g} on {report['examples']} validation examples)")
    return 0
