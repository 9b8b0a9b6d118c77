"""Time of one training step with torch's fused AdamW kernel vs its per-tensor loop (train.fused_optimizer).

    python benchmarks/optimizer_step.py                              # recipes/full_intent.yaml
    python benchmarks/optimizer_step.py --recipe recipes/lora_intent.yaml

One process builds the recipe's model twice (same seed, same weights) and trains both on the same
BANKING77 batches with the optimizer peftlab's trainer makes (``peftlab.training.optim.make_optimizer``), one
with ``train.fused_optimizer: true`` and one with ``false``. Each round runs one step of each model in a
shuffled order, so machine load hits both alike, and times its three parts: forward + backward,
gradient clipping, optimizer step. The report gives median / p10 / p90 milliseconds per part and the
ratio loop / fused. The weights' values do not affect the time.

Writes ``report.md`` and ``report.json`` (atomically) under ``--out``; the Markdown header holds the
command that reproduces it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "optimizer_step"
PARTS = ("forward_backward", "clip", "optimizer", "total")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/full_intent.yaml", help="recipe (default recipes/full_intent.yaml)")
    p.add_argument("--rounds", type=int, default=30, help="timed steps per variant (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: the visible cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"report folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from accelerate import PartialState

    import peftlab
    from peftlab.atomicio import write_json, write_text
    from peftlab.backbones import load_tokenizer
    from peftlab.bench import git_info, machine_info, versions
    from peftlab.runs import build_model
    from peftlab.tasks import LengthGroupedEpochSampler, get_task_class
    from peftlab.system import cpu_cores
    from peftlab.training.optim import make_optimizer

    transformers.logging.set_verbosity_error()
    device = PartialState().device
    if device.type == "cpu":
        torch.set_num_threads(args.threads or cpu_cores())
    recipe = peftlab.load_recipe(args.recipe)
    cfg = recipe.train
    task = get_task_class(recipe.task)(recipe)
    tokenizer = load_tokenizer(recipe.backbone)
    splits = task.load_splits()
    encoded = task.encode(splits.train, tokenizer, "train")
    collate = task.collator(tokenizer)
    if cfg.group_by_length:  # the batches the trainer would draw (its sampler, the recipe's seed)
        order = list(LengthGroupedEpochSampler(encoded.lengths(), cfg.batch_size, cfg.seed))
    else:
        order = list(range(len(encoded)))
        random.Random(cfg.seed).shuffle(order)
    batches = [collate([encoded[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]) for k in range(20)]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    variants = {}
    for fused in (True, False):
        torch.manual_seed(cfg.seed)
        built = build_model(recipe, task, tokenizer)
        model = built.model.to(device)
        model.train()
        trainable = built.method.trainable_parameters(model)
        recipe.train.fused_optimizer = fused
        optimizer = make_optimizer(model, trainable, recipe, built.ctx.head_names)
        actual = bool(optimizer.param_groups[0].get("fused"))
        variants["fused" if fused else "loop"] = (model, list(trainable.values()), optimizer, actual)
    n_trainable = sum(p.numel() for p in variants["fused"][1])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(name: str, batch: dict) -> dict[str, float]:
        model, params, optimizer, _ = variants[name]
        sync()
        t0 = time.perf_counter()
        loss = task.training_loss(model, batch)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        sync()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        return {"forward_backward": t1 - t0, "clip": t2 - t1, "optimizer": t3 - t2, "total": t3 - t0}

    rng = random.Random(args.seed)
    times = {name: {part: [] for part in PARTS} for name in variants}
    for i in range(args.warmup):
        for name in variants:
            step(name, batches[i % len(batches)])
    for r in range(args.rounds):
        names = list(variants)
        rng.shuffle(names)
        for name in names:
            for part, seconds in step(name, batches[r % len(batches)]).items():
                times[name][part].append(seconds * 1000)
    print(f"[optimizer_step] {args.rounds} rounds done", file=sys.stderr)

    rows = []
    for part in PARTS:
        fused_med = statistics.median(times["fused"][part])
        for name in variants:
            t = times[name][part]
            deciles = statistics.quantiles(t, n=10, method="inclusive")
            rows.append({"part": part, "variant": name, "median_ms": round(statistics.median(t), 2),
                         "p10_ms": round(deciles[0], 2), "p90_ms": round(deciles[-1], 2),
                         "vs_fused": round(statistics.median(t) / fused_med, 3) if fused_med else None})
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    padded = statistics.mean(int(b["input_ids"].numel()) for b in batches)
    env = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "device": str(device),
           "machine": machine_info(), "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
           "versions": versions(), "git": git_info()}
    command = " ".join(["python", "benchmarks/optimizer_step.py", *argv])
    report = {"command": command, "env": env, "recipe": args.recipe, "method": recipe.method.name,
              "trainable_params": n_trainable, "batch_size": cfg.batch_size, "mean_tokens_per_batch": tokens, "mean_padded_tokens_per_batch": padded,
              "fused_kernel_used": {name: v[3] for name, v in variants.items()}, "rows": rows,
              "samples_per_s": {name: round(cfg.batch_size / (statistics.median(times[name]["total"]) / 1000), 1)
                                for name in variants}}

    lines = [
        "# One training step: fused AdamW vs per-tensor loop (train.fused_optimizer)",
        "",
        f"Reproduce: `{command}` (from the repository root)",
        "",
        f"- generated {env['date_utc']} UTC by benchmarks/optimizer_step.py (not hand-edited)",
        f"- device {device} ({env['machine']['cpu']}, {env['machine']['cores']} cores visible, {env['torch_threads']} "
        f"torch thread(s)); load average at the end {', '.join(f'{x:.1f}' for x in env['load_average'])}",
        f"- {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}; git {(env['git']['commit'] or 'unknown')[:10]}"
        f"{' (with uncommitted changes)' if env['git']['dirty'] else ''}",
        f"- recipe `{args.recipe}`: method `{recipe.method.name}`, {n_trainable:,} trainable parameters, "
        f"batch {cfg.batch_size}: the first 20 batches the trainer draws (group_by_length {cfg.group_by_length}), "
        f"{tokens:.0f} tokens, {padded:.0f} with padding, on average; max_grad_norm {cfg.max_grad_norm}",
        f"- fused kernel in use: fused variant {variants['fused'][3]}, loop variant {variants['loop'][3]}",
        f"- {args.rounds} timed steps per variant after {args.warmup} warm-up steps; steps interleaved in a shuffled "
        "order each round",
        "",
        "| part | variant | median ms | p10 ms | p90 ms | vs fused |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['part']} | {r['variant']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | "
              f"{r['vs_fused']:.3f} |" for r in rows]
    sps = report["samples_per_s"]
    lines += ["", f"Training samples/s from the median step: fused {sps['fused']}, loop {sps['loop']} "
              f"(fused / loop {sps['fused'] / sps['loop']:.2f}x).", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    write_text(out / "report.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
