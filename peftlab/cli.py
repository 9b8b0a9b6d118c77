"""The ``peftlab`` command. Each subcommand is a thin wrapper over a Python call in peftlab.api.

Bad input prints one line ``peftlab: error: ...`` and exits 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Callable, Optional

from .errors import PeftlabError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--over` must not silently mean --overwrite
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2
        raise PeftlabError(f"command line: {message} (see `{self.prog} --help`)")


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


class _TqdmHandler(logging.StreamHandler):
    """Log lines on stderr that never share a line with a progress bar (tqdm clears and redraws it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging() -> None:
    """peftlab's log lines on stderr as ``[peftlab] message``, from the first process only."""
    logger = logging.getLogger("peftlab")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in [h for h in logger.handlers if getattr(h, "_peftlab_cli", False)]:
        logger.removeHandler(h)
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[peftlab] %(message)s"))
    handler.addFilter(lambda record: not _is_secondary_rank())
    handler._peftlab_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)


def _quiet_libraries() -> None:
    """Third-party warnings that say nothing to a peftlab user (each known and harmless)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    # bitsandbytes warns at import, on CPUs with AVX512-BF16, that the optional `kernels` package of its
    # packed CPU 4-bit inference format is missing; peftlab keeps 4-bit layers off that format.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in str(r.msg))
    # transformers reads these at import (importing it here would make `--help` slow)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (peftlab.cli.main called from Python)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def build_parser(wanted: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; ``wanted``: the command on the command line, whose module's arguments are loaded."""
    from ._version import __version__

    p = _Parser(prog="peftlab", description="Parameter-efficient fine-tuning recipes.")
    p.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train", help="train a recipe (same as accelerate launch peftlab/run.py RECIPE)",
        description="Train a recipe into its output.dir. `peftlab schema` lists every recipe key; "
        "`peftlab validate RECIPE` checks one without training.")
    t.add_argument("recipe", help="recipe YAML: backbone, task, data, method, train, output (see recipes/)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=1 method.r=16")
    t.add_argument("--resume", action="store_true", help="continue from the run's newest complete checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")

    v = sub.add_parser("validate", help="check a recipe (keys, data, labels, backbone) without training")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--print", dest="print_recipe", action="store_true", help="print the resolved recipe")

    sub.add_parser("schema", help="print every recipe key with its type, default and meaning")
    m = sub.add_parser("methods", help="list the registered methods")
    m.add_argument("--json", action="store_true")
    sub.add_parser("tasks", help="list the registered tasks, their metrics and task_options")
    sub.add_parser("backbones", help="list the packaged (offline) backbones")
    _add_extra_commands(sub, wanted)
    return p


# Subcommands whose arguments live in their own modules: (module, the line `peftlab --help` shows).
# A module is imported only when its command runs, so that help and --version do not import torch.
EXTRA_COMMANDS = {
    "predict": ("predict_cli", "predict with a run folder, an exported package or a merged checkpoint"),
    "merge": ("deploy.cli", "merge a run into a plain transformers checkpoint (verified against the run)"),
    "export": ("deploy.cli", "package a run (any method) for `peftlab predict`: adapter weights + config + base reference"),
    "bench": ("bench.cli", "run a benchmark spec: one process per cell, results as JSONL + report"),
    "report": ("bench.cli", "Markdown/CSV/PNG report of a bench's results JSONL"),
    "sweep": ("bench.cli", "a bench spec's sampled configurations as Ray Tune trials, ASHA early stopping ('.[ray]')"),
    "plan": ("planner.cli", "predict a recipe's peak memory and speed; --fit picks the batch that fits a budget"),
    "serve": ("serve", "HTTP server over several adapters on one base (pip install 'peftlab[serve]')"),
}


def _add_extra_commands(sub, wanted: Optional[str]) -> None:
    """The requested command's module adds its subcommands; the others are one-line placeholders."""
    loaded = EXTRA_COMMANDS[wanted][0] if wanted in EXTRA_COMMANDS else None
    if loaded:
        importlib.import_module(f"peftlab.{loaded}").add_commands(sub, command)
    for name, (module, help_line) in EXTRA_COMMANDS.items():
        if module != loaded:
            sub.add_parser(name, help=help_line)


@command("train")
def _train(args: argparse.Namespace) -> int:
    from .api import as_recipe, train
    from .system import prepare_bitsandbytes, skip_scipy

    if args.own_process:  # one recipe in this process: only the imports that recipe needs
        skip_scipy()
    recipe = as_recipe(args.recipe, args.overrides)
    if args.own_process:
        prepare_bitsandbytes(recipe.backbone.quantization)
    train(recipe, resume=args.resume, overwrite=args.overwrite)
    return 0


@command("validate")
def _validate(args: argparse.Namespace) -> int:
    from .api import as_recipe, validate

    recipe = as_recipe(args.recipe, args.overrides)
    summary = validate(recipe)
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
    parts = ", ".join(f"{k} {v}" for k, v in summary.items() if k != "recipe" and v is not None)
    print(f"ok: {summary['recipe']}: {parts}")
    return 0


@command("schema")
def _schema(args: argparse.Namespace) -> int:
    from .reference import describe_schema

    print(describe_schema(), end="")
    return 0


@command("methods")
def _methods(args: argparse.Namespace) -> int:
    from .methods import describe_methods, plugin_problems

    rows = describe_methods()
    for problem in plugin_problems():  # broken plugins are reported, the others still listed
        print(f"peftlab: warning: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'method':<{width}}  merges  quantized  description")
    for r in rows:
        merges = "yes" if r["merges"] else "no"
        quant = "yes" if r["quantization"] else "no"
        print(f"{r['name']:<{width}}  {merges:<6}  {quant:<9}  {r['description']}")
    return 0


@command("tasks")
def _tasks(args: argparse.Namespace) -> int:
    from .registry import TASKS

    for problem in TASKS.problems():
        print(f"peftlab: warning: {problem}", file=sys.stderr)
    for name, cls in TASKS.available().items():
        options = ", ".join(f"{k}={f.default!r}" for k, f in cls.Options.model_fields.items()) or "none"
        print(f"{name}\n    {cls.description}\n    metrics: {', '.join(cls.metrics)}; task_options: {options}")
    return 0


@command("backbones")
def _backbones(args: argparse.Namespace) -> int:
    from .backbones import packaged_backbones

    for name, pb in packaged_backbones().items():
        print(f"{name}\n    {pb.description}")
    return 0


def _is_secondary_rank() -> bool:
    return os.environ.get("RANK", "0") not in ("", "0")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may also follow the flags
    (``train R --overwrite train.epochs=1``), which argparse alone refuses."""
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """``argv`` None: this process's own command line (the console script, ``python -m``, run.py),
    so the command may tune the process for itself; a list: a call from Python, which it must not."""
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    setup_logging()
    try:
        args = parse_args(argv)
        args.own_process = own_process
        return COMMANDS[args.command](args)
    except PeftlabError as exc:
        # Every rank sees the same bad input; rank 0 reports it. Training failures print everywhere.
        if exc.exit_code != 2 or not _is_secondary_rank():
            prefix = f"[rank {os.environ.get('RANK')}] " if _is_secondary_rank() else ""
            print(f"peftlab: error: {prefix}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("peftlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
