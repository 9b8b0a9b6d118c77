"""What a finished run reports about itself: the processes' weight fingerprints and resources.json."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..errors import TrainingError
from ..system import peak_rss_bytes
from .launch import weight_fingerprint
from .state import TrainState


def rank_fingerprints(accelerator: Any, state: dict[str, torch.Tensor], sharded: bool) -> list[list[float]]:
    """Two sums of the trainable weights per process: every process must end with the same model.
    FSDP (``sharded``): one entry from rank 0, the sums of the gathered weights (``state`` is empty on
    the other processes, which hold other shards)."""
    if sharded:
        return [weight_fingerprint(state)] if accelerator.is_main_process else []
    mine = torch.tensor([weight_fingerprint(state)], dtype=torch.float64, device=accelerator.device)
    fingerprints = accelerator.gather(mine).cpu().tolist()
    if any(abs(a - b) > 1e-6 * max(1.0, abs(a)) for fp in fingerprints for a, b in zip(fp, fingerprints[0])):
        raise TrainingError(f"train: the {len(fingerprints)} processes ended with different weights {fingerprints}")
    return fingerprints


def run_resources(accelerator: Any, s: TrainState, fingerprints: list, *, load: tuple[int, int], wall_start: float,
                  threads: int, resumed: bool) -> dict:
    """resources.json: peak memory of every process (a collective), load memory, time and throughput."""
    acc = accelerator
    peaks = acc.gather(torch.tensor([peak_rss_bytes()], dtype=torch.float64, device=acc.device)).cpu().tolist()
    per_s = (lambda n: round(n / s.train_time, 3) if s.train_time else None)
    resources = {
        "peak_rss_bytes": int(max(peaks)), "peak_rss_bytes_per_rank": [int(p) for p in peaks],
        "load_rss_bytes": int(load[0]), "load_peak_rss_bytes": int(load[1]),
        "train_time_s": round(s.train_time, 3), "eval_time_s": round(s.eval_time, 3),
        "wall_time_s": round(time.perf_counter() - wall_start, 3),
        "train_samples": s.samples, "train_tokens": s.tokens,
        "samples_per_s": per_s(s.samples), "tokens_per_s": per_s(s.tokens),
        "optimizer_steps": s.step, "processes": acc.num_processes, "threads_per_process": threads,
        "device": str(acc.device), "rank_weight_fingerprints": fingerprints, "resumed": bool(resumed),
    }
    if torch.cuda.is_available() and acc.device.type == "cuda":
        resources["cuda_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated(acc.device))
        resources["cuda_max_memory_reserved_bytes"] = int(torch.cuda.max_memory_reserved(acc.device))
    return resources
