"""One server with N adapters on one base vs N merged checkpoints in N server processes.

    python benchmarks/serve_latency.py                  # trains 3 short MiniLM LoRA runs first
    python benchmarks/serve_latency.py --runs ner=runs/lora_ner intent=runs/lora_intent ...

Each run is also merged (``peftlab merge``). Three set-ups then serve the same requests through
``peftlab serve`` (HTTP on 127.0.0.1), one text per request, from ``--concurrency`` client threads
on this machine:

* ``one_server``: one process holding every run as an adapter (their common weights held once);
* ``one_server_shared_pass``: the same with ``--shared-pass`` (LoRA rows of every adapter in one
  backbone pass);
* ``n_processes``: one process per merged checkpoint, each request sent to its model's process;
* ``single_merged``: the first merged checkpoint's process alone, taking the same load.

The set-ups alternate over ``--rounds`` so that machine drift hits all alike. The report gives each
process's resident memory after the load (and its peak), p50 / p95 latency and requests/s, and the
ratios the project tracks: memory of ``one_server`` / ``n_processes`` and p95 of ``one_server`` /
``single_merged``. The weights' values do not affect latency or memory, so short runs are enough.
Writes report.json and report.md (atomically) under ``--out``, with the commit it ran at.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from merge_latency import percentile  # this folder is the script's first import path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_latency"
DEFAULT_RUNS = [("ner", "recipes/lora_ner.yaml", 42), ("intent", "recipes/lora_intent.yaml", 42),
                ("ner_s43", "recipes/lora_ner.yaml", 43)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", metavar="NAME=DIR", help="existing LoRA runs (default: train 3 short ones)")
    p.add_argument("--train-steps", type=int, default=20, help="optimizer steps of each short run (default 20)")
    p.add_argument("--requests", type=int, default=240, help="requests per set-up and round (default 240)")
    p.add_argument("--concurrency", type=int, default=6, help="client threads (default 6)")
    p.add_argument("--rounds", type=int, default=2, help="times each set-up is loaded, alternating (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"report folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace, work: Path) -> tuple[dict, dict]:
    """{name: run folder} and {name: merged folder}."""
    import peftlab
    from peftlab.api import merge

    runs = {}
    if args.runs:
        runs = {n: Path(d) for n, d in (item.split("=", 1) for item in args.runs)}
    else:
        for name, recipe, seed in DEFAULT_RUNS:
            runs[name] = work / name
            log(f"training {name} ({recipe}, seed {seed}, {args.train_steps} steps)")
            peftlab.train(str(ROOT / recipe), [f"train.max_steps={args.train_steps}", "train.trackers=none",
                                               f"train.seed={seed}", "data.max_train_samples=512",
                                               "data.max_test_samples=64", f"output.dir={runs[name]}"])
    merged = {}
    for name, run in runs.items():
        merged[name] = work / f"{name}-merged"
        log(f"merging {name}")
        merge(run, merged[name], verify_examples=32, eval_split="none")
    return runs, merged


def texts_for(run: Path, n: int, rng: random.Random) -> list[str]:
    """Test texts of the run's task (NER sentences joined by spaces, or classification texts)."""
    from peftlab.runs import load_run

    task = load_run(run).task
    rows = task.load_splits().test or []
    texts = [" ".join(r["tokens"]) if "tokens" in r else str(r[task.data_cfg.text_column]) for r in rows]
    return [rng.choice(texts) for _ in range(n)]


def log(msg: str) -> None:
    print(f"[serve_latency] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapters: list[str], *options: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "peftlab.cli", "serve", *adapters, "--port", str(port), *options],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"serve_latency: the server for {adapters} exited ({proc.returncode})")
            time.sleep(0.5)
    raise SystemExit(f"serve_latency: the server for {adapters} did not start in 300 s")


def rss_mib(pid: int) -> dict:
    """Resident and peak resident memory of a process (Linux /proc), MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mib": round(fields["VmRSS"], 1), "peak_rss_mib": round(fields["VmHWM"], 1)}


def load(targets: list[tuple[int, str, str]], concurrency: int) -> dict:
    """Send each (port, adapter, text) as one request from ``concurrency`` threads; latency stats."""
    latencies: list[float] = []
    errors: list[str] = []
    lock, queue = threading.Lock(), list(reversed(targets))

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                port, adapter, text = queue.pop()
            body = json.dumps({"texts": [text]}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/{adapter}/predict", data=body,
                                         headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=300) as resp:
                    resp.read()
            except OSError as exc:
                errors.append(str(exc))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    return {"requests": len(ms), "errors": len(errors), "wall_s": round(wall, 2),
            "requests_per_s": round(len(ms) / wall, 2), "p50_ms": round(percentile(ms, 0.5), 1),
            "p95_ms": round(percentile(ms, 0.95), 1), "mean_ms": round(statistics.fmean(ms), 1) if ms else None}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from peftlab.atomicio import write_json, write_text
    from peftlab.bench.provenance import git_info
    from peftlab.system import cpu_cores

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="serve-latency-"))
    runs, merged = prepare(args, work)
    names = list(runs)
    texts = {n: texts_for(runs[n], args.requests, rng) for n in names}
    log("starting the servers")
    one, one_port = start_server([f"{n}={runs[n]}" for n in names])
    shared, shared_port = start_server([f"{n}={runs[n]}" for n in names], "--shared-pass")
    procs = {n: start_server([f"{n}={merged[n]}"]) for n in names}
    mixed = [names[i % len(names)] for i in range(args.requests)]
    rng.shuffle(mixed)
    plans = {
        "one_server": [(one_port, n, texts[n][i]) for i, n in enumerate(mixed)],
        "one_server_shared_pass": [(shared_port, n, texts[n][i]) for i, n in enumerate(mixed)],
        "n_processes": [(procs[n][1], n, texts[n][i]) for i, n in enumerate(mixed)],
        "single_merged": [(procs[names[0]][1], names[0], texts[names[0]][i]) for i in range(args.requests)],
    }
    results: dict = {k: [] for k in plans}
    try:
        for name, plan in plans.items():  # warm-up: every model has run before timing
            load(plan[: 2 * args.concurrency], args.concurrency)
        for r in range(args.rounds):
            for name in (list(plans) if r % 2 == 0 else list(reversed(plans))):
                log(f"round {r + 1}: {name}")
                results[name].append(load(plans[name], args.concurrency))
        memory = {"one_server": rss_mib(one.pid), "one_server_shared_pass": rss_mib(shared.pid), "n_processes": {n: rss_mib(p.pid) for n, (p, _) in procs.items()}}
    finally:
        for p in [one, shared, *(p for p, _ in procs.values())]:
            p.terminate()
            p.wait(timeout=60)
    report = summarize(args, argv, names, results, memory, git_info(ROOT), cpu_cores())
    out = Path(args.out)
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    print((out / "report.md").read_text())
    return 0


def summarize(args, argv, names, results, memory, git, cores) -> dict:
    total = round(sum(m["rss_mib"] for m in memory["n_processes"].values()), 1)
    median = {k: {f: statistics.median(r[f] for r in rows) for f in ("p50_ms", "p95_ms", "requests_per_s")}
              for k, rows in results.items()}
    return {
        "command": " ".join(["python", "benchmarks/serve_latency.py", *argv]),
        "git": git, "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "cpu_cores": cores,
        "load_average": list(os.getloadavg()), "adapters": names, "requests": args.requests,
        "concurrency": args.concurrency, "rounds": args.rounds, "results": results, "median": median,
        "memory": {**memory, "n_processes_total_rss_mib": total},
        "ratios": {"memory_one_server_vs_n_processes": round(memory["one_server"]["rss_mib"] / total, 3),
                   "p95_one_server_vs_single_merged": round(median["one_server"]["p95_ms"]
                                                            / median["single_merged"]["p95_ms"], 3),
                   "p95_shared_pass_vs_one_server": round(median["one_server_shared_pass"]["p95_ms"]
                                                          / median["one_server"]["p95_ms"], 3)},
    }


def markdown(report: dict) -> str:
    m, r = report["memory"], report["ratios"]
    lines = [
        "# Serving: one server with several adapters vs one process per merged checkpoint", "",
        f"`{report['command']}` at commit `{report['git']['commit']}`"
        + (" (uncommitted changes)" if report["git"]["dirty"] else "")
        + f", {report['date_utc']} UTC, {report['cpu_cores']} CPU cores, load {report['load_average'][0]:.2f}.", "",
        f"Adapters: {', '.join(report['adapters'])} (MiniLM-L6 LoRA runs). {report['requests']} one-text requests per "
        f"set-up and round from {report['concurrency']} client threads, {report['rounds']} rounds; medians over rounds.", "",
        "| set-up | processes | resident memory (MiB) | p50 ms | p95 ms | requests/s |", "|---|--:|--:|--:|--:|--:|",
        f"| one_server | 1 | {m['one_server']['rss_mib']:,.0f} | {report['median']['one_server']['p50_ms']:.1f} | "
        f"{report['median']['one_server']['p95_ms']:.1f} | {report['median']['one_server']['requests_per_s']:.1f} |",
        f"| one_server --shared-pass | 1 | {m['one_server_shared_pass']['rss_mib']:,.0f} | "
        f"{report['median']['one_server_shared_pass']['p50_ms']:.1f} | "
        f"{report['median']['one_server_shared_pass']['p95_ms']:.1f} | "
        f"{report['median']['one_server_shared_pass']['requests_per_s']:.1f} |",
        f"| n_processes | {len(m['n_processes'])} | {m['n_processes_total_rss_mib']:,.0f} | "
        f"{report['median']['n_processes']['p50_ms']:.1f} | {report['median']['n_processes']['p95_ms']:.1f} | "
        f"{report['median']['n_processes']['requests_per_s']:.1f} |",
        f"| single_merged | 1 (of the above) | {m['n_processes'][report['adapters'][0]]['rss_mib']:,.0f} | "
        f"{report['median']['single_merged']['p50_ms']:.1f} | {report['median']['single_merged']['p95_ms']:.1f} | "
        f"{report['median']['single_merged']['requests_per_s']:.1f} |", "",
        f"- memory, one server / {len(m['n_processes'])} processes: **{r['memory_one_server_vs_n_processes']:.3f}x**",
        f"- p95 latency, one server (mixed adapters) / one merged model (same load): "
        f"**{r['p95_one_server_vs_single_merged']:.3f}x**",
        f"- p95 latency, one server with shared LoRA passes / one batch per adapter: "
        f"**{r['p95_shared_pass_vs_one_server']:.3f}x**", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
