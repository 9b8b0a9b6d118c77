"""``peftlab plan RECIPE [overrides] [--device D] [--memory M] [--fit] [--json]``."""

from __future__ import annotations

import json


def add_commands(sub, command) -> None:
    p = sub.add_parser("plan", description="Predict a recipe's peak memory and speed without training; "
                       "with --fit, the largest batch (and checkpointing, eval batch) that fits --memory.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for train")
    p.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (default: this machine's)")
    p.add_argument("--memory", metavar="SIZE", help="memory budget, e.g. 24GiB (default with --fit: available now)")
    p.add_argument("--fit", action="store_true", help="choose the largest setting that fits the budget")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    @command("plan")
    def _plan(args) -> int:
        from pathlib import Path

        from ..recipe import load_recipe
        from ..system import prepare_bitsandbytes, set_mmap_threshold, skip_scipy
        from . import plan

        skip_scipy()  # as `peftlab train` does: its base memory is measured
        recipe = load_recipe(Path(args.recipe), args.overrides)
        prepare_bitsandbytes(recipe.backbone.quantization)  # as `peftlab train` does: its base memory is measured
        if recipe.train.cpu_mmap_threshold_mb and args.device != "cuda":
            set_mmap_threshold(recipe.train.cpu_mmap_threshold_mb)
        result = plan(recipe, device=args.device, memory=args.memory, fit=args.fit)
        print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
        return 0 if result.fits is not False else 1
