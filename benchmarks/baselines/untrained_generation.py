"""Score the untrained backbone of a causal_lm recipe on its test split (the zero-shot reference).

    python benchmarks/baselines/untrained_generation.py recipes/lora_intent_gen.yaml [key=value ...] [--out FILE]

Same data, templates, chat-template choice, greedy generation (data.max_new_tokens) and scoring as
the task's evaluation after training (exact match, token F1, completion loss / perplexity); no
method is applied and nothing trains. Writes the metrics as JSON (atomically) to ``--out``
(default: <output.dir>/untrained_test.json) and prints them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from peftlab.atomicio import write_json
    from peftlab.backbones import load_model, load_tokenizer
    from peftlab.errors import PeftlabError
    from peftlab.recipe import load_recipe
    from peftlab.tasks import get_task_class
    from peftlab.system import peak_rss_bytes, run_threads

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.task != "causal_lm":
            raise PeftlabError(f"{args.recipe}: task: this script scores causal_lm recipes (got {recipe.task})")
        task = get_task_class(recipe.task)(recipe)
        splits = task.load_splits()
        if splits.test is None:
            raise PeftlabError(f"{args.recipe}: data.test: the recipe has no test split to score")
    except PeftlabError as exc:
        print(f"untrained_generation: error: {exc}", file=sys.stderr)
        return 2
    accelerator = Accelerator()
    if accelerator.device.type == "cpu":
        torch.set_num_threads(run_threads(recipe.train.num_threads))
    tokenizer = load_tokenizer(recipe.backbone)
    encoded = task.encode(splits.test, tokenizer, "test").sorted_by_length()
    kwargs = {"pad_token_id": tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else {}
    device = accelerator.device if recipe.backbone.quantization != "none" else None
    model = load_model(recipe.backbone, task.auto_model, kwargs, device=device)
    dl = DataLoader(encoded, batch_size=recipe.train.eval_batch_size, shuffle=False, collate_fn=task.collator(tokenizer))
    model, dl = accelerator.prepare(model, dl)
    metrics = task.evaluate(model, dl, accelerator, encoded)
    metrics["peak_rss_bytes"] = peak_rss_bytes()
    metrics["backbone"] = recipe.backbone.name
    metrics["test_file"] = recipe.data.test
    out = Path(args.out) if args.out else Path(recipe.output.dir) / "untrained_test.json"
    if accelerator.is_main_process:
        write_json(out, metrics)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        print(json.dumps(scalars, indent=2))
        print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
