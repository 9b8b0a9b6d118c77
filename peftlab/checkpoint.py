"""Resumable training checkpoints, safetensors + JSON only (nothing is pickled).

A checkpoint folder ``checkpoints/step-000123`` holds:

* ``trainable.safetensors``: the trainable parameters (by name) of the unwrapped model;
* ``optimizer.safetensors`` + ``optimizer.json``: AdamW moments and param groups;
* ``rng.safetensors``: the torch CPU (and CUDA) RNG state of every rank;
* ``best.safetensors``: the trainable parameters of the best evaluation so far (a hard link to
  ``checkpoints/best/trainable.safetensors`` when the filesystem allows it), so that a resumed run
  restores the best model that belongs to this point of training, never one from a later step of
  the interrupted run;
* ``state.json``: step, epoch, batches consumed in that epoch, best metric so far, history,
  and the scheduler state. It is written last: a folder without it is incomplete.

Folders are written with :func:`peftlab.atomicio.atomic_dir`, so a checkpoint either exists complete or
not at all; ``latest_checkpoint`` also ignores any folder that lacks ``state.json``, and
:func:`load_latest_checkpoint` falls back to the previous checkpoint when the newest cannot be read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .atomicio import TMP_PREFIX, atomic_dir
from .sharded import shard_like, whole

STEP_RE = re.compile(r"^step-(\d+)$")
BEST_FILE = "best.safetensors"
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json")

log = logging.getLogger("peftlab")


def optimizer_to_tensors(optimizer: Any, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state as whole tensors (FSDP shards gathered: every process must call it);
    ``keep=False`` on processes that do not write."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                full = whole(value, keep)
                if full is not None:
                    tensors[f"{idx}.{key}"] = full
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def shard_optimizer_state(state_dict: dict, optimizer: Any) -> dict:
    """A saved (whole) optimizer state split the way this process's sharded parameters are."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, params))
    for idx, values in state_dict["state"].items():
        param = by_id.get(int(idx))
        for key, value in list(values.items()):
            if param is not None and torch.is_tensor(value) and value.shape == param.shape:
                values[key] = shard_like(value, param)
    return state_dict


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
    # .clone(): row `rank` is a view at a storage offset, which torch.set_rng_state does not honour
    # (rank 1 of a 2-process resume crashed with SIGSEGV)
    torch.set_rng_state(tensors["torch_cpu"][rank].to(torch.uint8).cpu().clone())
    if "torch_cuda" in tensors and accelerator.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["torch_cuda"][rank].to(torch.uint8).cpu().clone(), accelerator.device)


def save_checkpoint(
    folder: Path,
    trainable: dict[str, torch.Tensor],
    optimizer: tuple[dict[str, torch.Tensor], dict],
    rng: dict[str, torch.Tensor],
    state: dict,
    best_file: Optional[Path] = None,
) -> Path:
    """Write one complete checkpoint atomically (called on rank 0 only).

    ``optimizer``: what :func:`optimizer_to_tensors` returned. ``best_file``: the best model's
    trainable state so far, kept with the checkpoint (hard link).
    """
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = optimizer
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta), encoding="utf-8")
        save_file(rng, str(tmp / "rng.safetensors"))
        if best_file is not None and Path(best_file).is_file():
            link_or_copy(Path(best_file), tmp / BEST_FILE)
        (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    return folder


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (files written by atomic_dir are never modified in place), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


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
        # renamed first: a kill during the delete leaves a temporary (removed at the next start),
        # never a half-deleted step-* folder that looks like a checkpoint
        trash = old.parent / f"{TMP_PREFIX}{old.name}.old-{os.getpid()}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(folder: Path) -> dict[str, Any]:
    best = folder / BEST_FILE
    return {
        "trainable": load_file(str(folder / "trainable.safetensors")),
        "optimizer": optimizer_from_tensors(
            load_file(str(folder / "optimizer.safetensors")),
            json.loads((folder / "optimizer.json").read_text(encoding="utf-8")),
        ),
        "rng": load_file(str(folder / "rng.safetensors")),
        "state": json.loads((folder / "state.json").read_text(encoding="utf-8")),
        "best": load_file(str(best)) if best.is_file() else None,
    }


def load_latest_checkpoint(checkpoints_dir: Path) -> tuple[Optional[Path], Optional[dict], list[str]]:
    """The newest checkpoint that loads completely: (folder, content, problems with newer ones).

    A checkpoint that cannot be read (a truncated file after a full disk, a filesystem that does
    not honour rename atomicity) is skipped with a warning and the previous one is used.
    """
    problems: list[str] = []
    for folder in reversed(list_checkpoints(checkpoints_dir)):
        try:
            ckpt = load_checkpoint(folder)
            for key in ("step", "epoch", "batches_done", "scheduler"):
                if key not in ckpt["state"]:
                    raise ValueError(f"state.json has no '{key}'")
        except Exception as exc:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            problems.append(f"{folder.name}: {type(exc).__name__}: {first}")
            log.warning("resume: skipping unreadable checkpoint %s (%s)", folder, first)
            continue
        return folder, ckpt, problems
    return None, None, problems
