"""Inference latency of a merged LoRA checkpoint vs the unmerged adapter model vs the plain backbone.

    python benchmarks/merge_latency.py                       # trains a short LoRA NER run first
    python benchmarks/merge_latency.py --run runs/lora_ner   # or uses an existing LoRA run

One process measures three models of the same architecture on the same WNUT-17 test sentences:

* ``backbone``: the plain backbone with a (fresh) token-classification head, ``AutoModelForTokenClassification``;
* ``unmerged``: the run as trained, backbone + LoRA adapter (peft), from ``peftlab.runs.load_run``;
* ``merged``: the checkpoint written by ``peftlab merge``, loaded with plain transformers.

Batch 1 (one sentence per call) and batch 32 (32 sentences padded to the longest). Calls are
interleaved round by round in a shuffled model order, so machine load hits all three models alike;
the report gives median / p10 / p90 milliseconds per call and the ratio to the plain backbone. The
weights' values do not affect latency, so a short training run is enough.

Writes ``report.md`` and ``report.json`` (atomically) under ``--out``; the Markdown header holds the
command that reproduces it.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "merge_latency"
WNUT_TEST = ROOT.parent / "shared" / "data" / "wnut17" / "emerging.test.annotated"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="an existing LoRA run folder (default: train a short one into a temp folder)")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "lora_ner.yaml"),
                   help="recipe of the short training run (default recipes/lora_ner.yaml)")
    p.add_argument("--train-steps", type=int, default=12, help="optimizer steps of the short run (default 12)")
    p.add_argument("--rounds", type=int, default=40, help="timed calls per model and batch size (default 40)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model first (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a shared machine)")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"report folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    return p.parse_args(argv)


def command_line(argv: list[str]) -> str:
    return " ".join(["python", "benchmarks/merge_latency.py", *argv])


def train_short_run(recipe: str, steps: int, where: Path) -> Path:
    import peftlab

    out = where / "lora_run"
    peftlab.train(recipe, [f"train.max_steps={steps}", "train.trackers=none", "train.eval_batch_size=128",
                           "data.max_train_samples=512", f"output.dir={out}"], overwrite=True)
    return out


def load_sentences(n: int) -> list[list[str]]:
    from peftlab.data import read_conll

    return [s["tokens"] for s in read_conll(WNUT_TEST)[:n]]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks; nan for no values."""
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from transformers import AutoModelForTokenClassification

    import peft
    import peftlab
    from peftlab.atomicio import write_json, write_text
    from peftlab.backbones import resolve_backbone
    from peftlab.deploy import merge
    from peftlab.runs import load_run
    from peftlab.util import read_json
    from peftlab.system import cpu_cores

    transformers.logging.set_verbosity_error()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="merge-latency-"))
    run_dir = Path(args.run) if args.run else None
    if run_dir is None:
        print(f"[merge_latency] training a {args.train_steps}-step LoRA run ({args.recipe})", file=sys.stderr)
        run_dir = train_short_run(args.recipe, args.train_steps, work)
    merged_dir = work / "merged"
    print(f"[merge_latency] merging {run_dir} -> {merged_dir}", file=sys.stderr)
    verify = merge(run_dir, merged_dir, verify_examples=64, eval_split="none")

    from accelerate import PartialState

    device = PartialState().device
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    run = load_run(run_dir, device=device)
    tokenizer = run.tokenizer
    kwargs = run.task.model_kwargs()
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    backbone_path = resolve_backbone(run.recipe.backbone)
    models = {
        "backbone": AutoModelForTokenClassification.from_pretrained(backbone_path, **kwargs),
        "unmerged": run.model,
        "merged": AutoModelForTokenClassification.from_pretrained(str(merged_dir)),
    }
    for m in models.values():
        m.to(device)
        m.eval()
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}

    sentences = load_sentences(max(batch_sizes) * 2)
    inputs = {}
    for bs in batch_sizes:
        if bs == 1:
            batches = [[s] for s in sentences[:16]]  # rounds cycle through 16 single sentences
        else:
            batches = [sentences[:bs]]
        inputs[bs] = [
            {k: v.to(device) for k, v in tokenizer(b, is_split_into_words=True, truncation=True, max_length=128,
                                                   padding=True, return_tensors="pt").items()}
            for b in batches
        ]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rng = random.Random(args.seed)
    times: dict[int, dict[str, list[float]]] = {bs: {n: [] for n in models} for bs in batch_sizes}
    with torch.inference_mode():
        for bs in batch_sizes:
            for name, m in models.items():
                for i in range(args.warmup):
                    m(**inputs[bs][i % len(inputs[bs])])
            for r in range(args.rounds):
                order = list(models)
                rng.shuffle(order)
                x = inputs[bs][r % len(inputs[bs])]
                for name in order:
                    sync()
                    t0 = time.perf_counter()
                    models[name](**x)
                    sync()
                    times[bs][name].append((time.perf_counter() - t0) * 1000)
            print(f"[merge_latency] batch {bs}: done", file=sys.stderr)

    rows = []
    for bs in batch_sizes:
        base = statistics.median(times[bs]["backbone"])
        tokens = [int(x["attention_mask"].sum()) for x in inputs[bs]]
        for name in models:
            t = times[bs][name]
            med = statistics.median(t)
            rows.append({
                "batch_size": bs, "model": name, "calls": len(t), "median_ms": round(med, 3),
                "p10_ms": round(percentile(t, 0.1), 3), "p90_ms": round(percentile(t, 0.9), 3),
                "vs_backbone": round(med / base, 3),
                "tokens_per_s": round(statistics.mean(tokens) / (med / 1000), 1),
            })

    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    env = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores_visible": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peftlab": peftlab.__version__,
    }
    report = {
        "command": command_line(argv),
        "env": env,
        "run": {"dir": str(run_dir), "backbone": run.recipe.backbone.name, "method": run.recipe.method.name,
                "method_options": run.method.options.model_dump(mode="json"), "steps": metrics.get("steps"),
                "trained_here": args.run is None},
        "merge_verification": {k: verify[k] for k in ("kind", "max_abs_logit_diff", "mean_abs_logit_diff",
                                                      "agreement", "examples")},
        "parameters": counts,
        "inputs": {str(bs): {"sentences": bs, "calls_cycle_over": len(inputs[bs]),
                             "padded_length": [int(x["input_ids"].shape[1]) for x in inputs[bs]]}
                   for bs in batch_sizes},
        "rounds": args.rounds,
        "warmup": args.warmup,
        "results": rows,
    }
    for bs in batch_sizes:
        med = {r["model"]: r["median_ms"] for r in rows if r["batch_size"] == bs}
        report.setdefault("merged_vs_backbone", {})[str(bs)] = round(med["merged"] / med["backbone"], 3)
        report.setdefault("merged_vs_unmerged", {})[str(bs)] = round(med["merged"] / med["unmerged"], 3)

    out = Path(args.out)
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    print((out / "report.md").read_text())
    return 0


def markdown(report: dict) -> str:
    env, run = report["env"], report["run"]
    opts = ", ".join(f"{k}={v}" for k, v in run["method_options"].items() if k in ("r", "alpha", "target_modules"))
    lines = [
        "# Merge latency: merged LoRA checkpoint vs unmerged adapter vs plain backbone",
        "",
        f"Reproduce: `{report['command']}` (from the repository root)",
        "",
        f"- generated {env['date_utc']} UTC by benchmarks/merge_latency.py (not hand-edited)",
        f"- device {env['device']} ({env['cpu']}, {env['cpu_cores_visible']} cores visible, {env['torch_threads']} torch "
        f"thread(s)); load average at the end {', '.join(f'{x:.1f}' for x in env['load_average'])}",
        f"- torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, peftlab {env['peftlab']}",
        f"- model: `{run['backbone']}` + `{run['method']}` ({opts}); "
        + ("a short run trained by this script" if run["trained_here"] else f"run `{run['dir']}`")
        + f" ({run['steps']} steps; weights do not affect latency)",
        f"- merge verification: {report['merge_verification']['kind']}, max |Δlogit| "
        f"{report['merge_verification']['max_abs_logit_diff']:.3g}, agreement "
        f"{100 * report['merge_verification']['agreement']:.2f}% on {report['merge_verification']['examples']} examples",
        "- parameters: " + ", ".join(f"{k} {v:,}" for k, v in report["parameters"].items()),
        f"- inputs: WNUT-17 test sentences; batch 1 cycles over {report['inputs'].get('1', {}).get('calls_cycle_over', '-')} "
        f"single sentences, batch 32 is the first 32 sentences padded to "
        f"{report['inputs'].get('32', {}).get('padded_length', ['-'])[0]} tokens",
        f"- {report['rounds']} timed calls per model and batch size after {report['warmup']} warm-up calls; "
        f"calls interleaved in a shuffled model order each round",
        "",
        "| batch | model | median ms | p10 ms | p90 ms | vs backbone | tokens/s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['batch_size']} | {r['model']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | "
                     f"{r['p90_ms']:.2f} | {r['vs_backbone']:.3f} | {r['tokens_per_s']:,.0f} |")
    lines += ["", "Merged / plain backbone (median): " + ", ".join(
        f"batch {bs}: {v:.3f}" for bs, v in report["merged_vs_backbone"].items())
        + "; merged / unmerged adapter: " + ", ".join(
        f"batch {bs}: {v:.3f}" for bs, v in report["merged_vs_unmerged"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
