"""Resumable training checkpoints, safetensors + JSON only (nothing is pickled).

A checkpoint folder ``checkpoints/step-000123`` holds:

* ``trainable.safetensors``: the trainable parameters (by name) of the unwrapped model;
* ``optimizer.safetensors`` + ``optimizer.json``: AdamW moments and param groups;
* ``rng.safetensors``: the torch CPU (and CUDA) RNG state of every rank;
* ``state.json``: step, epoch, batches consumed in that epoch, best metric so far, history,
  and the scheduler state. It is written last: a folder without it is incomplete.

Folders are written with :func:`peftlab.atomicio.atomic_dir`, so a checkpoint either exists complete or
not at all; ``latest_checkpoint`` also ignores any folder that lacks ``state.json``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .atomicio import atomic_dir

STEP_RE = re.compile(r"^step-(\d+)$")


def optimizer_to_tensors(optimizer: Any) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_tensors(accelerator: Any) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, gathered to all ranks (rank 0 saves them)."""
    out = {}
    cpu = torch.get_rng_state().to(accelerator.device).unsqueeze(0)
    out["torch_cpu"] = accelerator.gather(cpu).cpu()
    if torch.cuda.is_available() and accelerator.device.type == "cuda":
        gpu = torch.cuda.get_rng_state(accelerator.device).to(accelerator.device).unsqueeze(0)
        out["torch_cuda"] = accelerator.gather(gpu).cpu()
    return out


def restore_rng(tensors: dict[str, torch.Tensor], accelerator: Any) -> None:
    rank = accelerator.process_index
    torch.set_rng_state(tensors["torch_cpu"][rank].to(torch.uint8).cpu())
    if "torch_cuda" in tensors and accelerator.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["torch_cuda"][rank].to(torch.uint8).cpu(), accelerator.device)


def save_checkpoint(
    folder: Path,
    trainable: dict[str, torch.Tensor],
    optimizer: Any,
    rng: dict[str, torch.Tensor],
    state: dict,
) -> Path:
    """Write one complete checkpoint atomically (called on rank 0 only)."""
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta), encoding="utf-8")
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    return folder


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        m = STEP_RE.match(child.name)
        if m and child.is_dir() and (child / "state.json").is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    ckpts = list_checkpoints(checkpoints_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    ckpts = list_checkpoints(checkpoints_dir)
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path) -> dict[str, Any]:
    return {
        "trainable": load_file(str(folder / "trainable.safetensors")),
        "optimizer": optimizer_from_tensors(
            load_file(str(folder / "optimizer.safetensors")),
            json.loads((folder / "optimizer.json").read_text(encoding="utf-8")),
        ),
        "rng": load_file(str(folder / "rng.safetensors")),
        "state": json.loads((folder / "state.json").read_text(encoding="utf-8")),
    }
