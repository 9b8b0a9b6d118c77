"""Where the time and the memory of a training step go, per method.

    python benchmarks/profile_methods.py                       # MiniLM on WNUT-17: the configurations below
    python benchmarks/profile_methods.py --only lora --only full --steps 40

Each configuration runs in its own process (so its resident memory is its own) and does what
``peftlab train`` does, with the trainer's own functions: the imports, the data, the model
(``runs.build_model``), the optimizer (``training.optim.make_optimizer``) and the first ``--steps`` batches
of the trainer's length-grouped sampler (the longest batch first). It records

* resident memory after each phase: imports, data, model, the training steps, one evaluation pass;
* what autograd saves for backward on the longest batch (distinct tensors, parameters excluded);
* the median forward+backward / clip / optimizer time of a step, and samples/s;
* the operators that take the most time (``torch.profiler``, self CPU/CUDA time over a few steps).

Configurations alternate in one run, so their ratios are comparable; absolute times are not
comparable between runs on a shared machine. Writes ``report.md`` and ``report.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "profile_minilm"
# name -> (recipe, overrides)
CONFIGS = {
    "full": ("recipes/full_ner.yaml", []),
    "lora": ("recipes/lora_ner.yaml", []),
    "lora-peft-forward": ("recipes/lora_ner.yaml", ["method.fast_path=false"]),
    "lora-no-dropout": ("recipes/lora_ner.yaml", ["method.dropout=0"]),
    "lora-keep-inputs": ("recipes/lora_ner.yaml", ["method.recompute_inputs=false"]),
    "adapter-houlsby": ("recipes/adapter_ner.yaml", []),
    "int8-lora": ("recipes/lora8_ner.yaml", ["backbone.quantization=int8"]),
    "nf4-qlora": ("recipes/qlora_ner.yaml", []),
    "full-adaptive-malloc": ("recipes/full_ner.yaml", ["train.cpu_mmap_threshold_mb=0"]),
    "lora-adaptive-malloc": ("recipes/lora_ner.yaml", ["train.cpu_mmap_threshold_mb=0"]),
}


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    with open("/proc/self/status") as fh:  # VmHWM: this process's own high-water mark
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def worker(recipe_path: str, overrides: list[str], steps: int) -> dict:
    """One configuration, in this process; returns its measurements."""
    phases = {"start": (rss_mib(), peak_mib())}
    from peftlab.system import prepare_bitsandbytes, skip_scipy

    skip_scipy()  # the imports `peftlab train` makes (it hides SciPy, and bitsandbytes when unquantized)
    import torch
    from torch.utils.data import DataLoader

    from peftlab import dropout as fast_dropout
    from peftlab.backbones import load_tokenizer
    from peftlab.recipe import load_recipe
    from peftlab.runs import build_model, parameter_report
    from peftlab.tasks import LengthGroupedEpochSampler, get_task_class
    from peftlab.system import run_threads, set_mmap_threshold
    from peftlab.training.optim import make_optimizer

    phases["imports"] = (rss_mib(), peak_mib())
    recipe = load_recipe(ROOT / recipe_path, overrides)
    prepare_bitsandbytes(recipe.backbone.quantization)
    cfg = recipe.train
    from accelerate import PartialState

    device = PartialState().device
    if device.type == "cpu":
        torch.set_num_threads(run_threads(cfg.num_threads))
        if cfg.cpu_mmap_threshold_mb:
            set_mmap_threshold(cfg.cpu_mmap_threshold_mb)
    torch.manual_seed(cfg.seed)
    task = get_task_class(recipe.task)(recipe)
    splits = task.load_splits()
    tokenizer = load_tokenizer(recipe.backbone)
    train = task.encode(splits.train, tokenizer, "train")
    dev = task.encode(splits.validation, tokenizer, "validation").sorted_by_length()
    phases["data"] = (rss_mib(), peak_mib())
    built = build_model(recipe, task, tokenizer, device=device if recipe.backbone.quantization != "none" else None)
    model = built.model.to(device)
    fast_dropout.install_for_run(model, cfg.cpu_fast_dropout, device)  # as the trainer does
    trainable = built.method.trainable_parameters(model)
    optimizer = make_optimizer(model, trainable, recipe, built.ctx.head_names)
    phases["model"] = (rss_mib(), peak_mib())
    collate = task.collator(tokenizer)
    sampler = LengthGroupedEpochSampler(train.lengths(), cfg.batch_size, cfg.seed)
    loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate)
    batches = []
    for batch in loader:
        batches.append({k: v.to(device) for k, v in batch.items()})
        if len(batches) == steps:
            break

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(batch: dict) -> tuple[float, float, float]:
        sync()
        t0 = time.perf_counter()
        task.training_loss(model, batch).backward()
        sync()
        t1 = time.perf_counter()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
        sync()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    model.train()
    saved = saved_for_backward(model, task, batches[0])
    times = [step(b) for b in batches]
    phases["train steps"] = (rss_mib(), peak_mib())
    eval_loader = DataLoader(dev, batch_size=cfg.eval_batch_size, collate_fn=collate)
    with torch.no_grad():
        model.eval()
        for batch in eval_loader:
            model(**{k: v.to(device) for k, v in batch.items()})
        model.train()
    phases["evaluation"] = (rss_mib(), peak_mib())
    ops = top_operators(step, batches[: min(6, len(batches))], device)
    counted = times[2:] or times  # the first steps warm up kernels and the allocator
    total = [sum(t) for t in counted]
    samples = sum(int(b["input_ids"].shape[0]) for b in batches[2:] or batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[2:] or batches)
    params = parameter_report(built)
    return {
        "method": built.method.name, "quantization": recipe.backbone.quantization,
        "trainable_params": params["trainable_params"], "device": str(device),
        "phases_mib": {k: [round(v[0], 1), round(v[1], 1)] for k, v in phases.items()},
        "saved_for_backward_mib": saved,
        "longest_batch": list(batches[0]["input_ids"].shape),
        "median_ms": {"forward_backward": _med(counted, 0), "clip": _med(counted, 1), "optimizer": _med(counted, 2),
                      "step": round(statistics.median(total) * 1000, 2)},
        "samples_per_s": round(samples / sum(total), 2), "tokens_per_s": round(tokens / sum(total), 1),
        "cuda_max_memory_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if device.type == "cuda" else None,
        "top_operators": ops,
    }


def _med(times: list, i: int) -> float:
    return round(statistics.median(t[i] for t in times) * 1000, 2)


def saved_for_backward(model, task, batch: dict) -> dict:
    """MiB of the distinct tensors autograd saves on one forward, split into activations and weights."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.training_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    acts = sum(v for k, v in seen.items() if k not in params)
    weights = sum(v for k, v in seen.items() if k in params)
    return {"activations": round(acts / 2**20, 1), "weights": round(weights / 2**20, 1)}


def top_operators(step, batches: list, device, n: int = 14) -> list:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for b in batches:
            step(b)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    return [{"op": e.key, "share": round(getattr(e, key) / total, 3), "calls_per_step": round(e.count / len(batches), 1)}
            for e in events[:n]]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", help="configurations to run (default: all)")
    p.add_argument("--steps", type=int, default=30, help="training steps per configuration (default 30)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--worker", nargs=2, metavar=("NAME", "FILE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        name, out = args.worker
        recipe, overrides = CONFIGS[name]
        result = worker(recipe, overrides, args.steps)
        Path(out).write_text(json.dumps(result), encoding="utf-8")
        return 0
    names = [n for n in CONFIGS if not args.only or n in args.only]
    results = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        tmp = out / f".{name}.json"
        print(f"[profile] {name}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", name, str(tmp), "--steps", str(args.steps)],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        results[name] = json.loads(tmp.read_text(encoding="utf-8"))
        tmp.unlink()
    write_report(out, results, ["python", "benchmarks/profile_methods.py", *argv])
    return 0


def write_report(out: Path, results: dict, command: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from peftlab.atomicio import write_json, write_text
    from peftlab.bench import git_info, machine_info, versions

    env = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
           "load_average": list(os.getloadavg()), "versions": versions(), "git": git_info()}
    write_json(out / "report.json", {"command": " ".join(command), "env": env, "results": results})
    base = results.get("full")
    git = env["git"]
    lines = [
        "# Where a training step's time and memory go (MiniLM-L6, WNUT-17)", "",
        f"Reproduce: `{' '.join(command)}` (from the repository root). Generated {env['date_utc']} UTC by "
        f"benchmarks/profile_methods.py, not hand-edited; git {(git['commit'] or 'unknown')[:10]}"
        f"{' (with uncommitted changes)' if git['dirty'] else ''}; {env['machine']['cpu']}, "
        f"{env['machine']['cores']} cores; load average at the end {env['load_average'][0]:.1f}.", "",
        "Resident memory (MiB) after each phase, in one process per configuration; `peak` is the process's "
        "peak after the training steps and after one evaluation pass over the dev set.", "",
        "| configuration | trainable | imports | data | model | after steps | peak train | peak eval | saved activations (longest batch) | step ms | fwd+bwd ms | optimizer ms | samples/s | vs full |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in results.items():
        ph = r["phases_mib"]
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else ""
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {ph['imports'][0]:.0f} | {ph['data'][0]:.0f} | {ph['model'][0]:.0f} | "
            f"{ph['train steps'][0]:.0f} | {ph['train steps'][1]:.0f} | {ph['evaluation'][1]:.0f} | "
            f"{r['saved_for_backward_mib']['activations']:.0f} | {r['median_ms']['step']:.0f} | "
            f"{r['median_ms']['forward_backward']:.0f} | {r['median_ms']['optimizer']:.1f} | {r['samples_per_s']:.1f} | {ratio} |")
    lines += ["", "Operators with the most self time over a few steps (share of the profiled time, calls per step):", ""]
    for name, r in results.items():
        ops = ", ".join(f"`{o['op']}` {100 * o['share']:.0f}% ({o['calls_per_step']:g})" for o in r["top_operators"])
        lines.append(f"- **{name}**: {ops}")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
