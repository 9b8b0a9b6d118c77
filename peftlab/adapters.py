"""Several runs on one base, in one process (``peftlab.api.load_adapters``, ``peftlab serve``).

Each run (or export, or merged checkpoint) loads as its own :class:`~peftlab.predict.Predictor`, with
its own method, task head and labels, so a request gets exactly what ``peftlab predict`` gives on that
folder. What the runs have in common is held once: after each load, every floating-point weight equal
to one already loaded (the frozen backbone under LoRA, the peft tuners, bottleneck adapters, prefix
tuning or a trained head) is pointed at that tensor, and the copy is freed. Weights are only compared
and shared, never changed, so each adapter computes what it computes alone. Quantized weights (int8,
4-bit) and anything a method changed (a full fine-tune's backbone) stay each run's own. LoRA runs on
the shared backbone also share forward passes: a batch mixing them runs the backbone once
(:mod:`peftlab.mixed`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from .errors import PeftlabError
from .mixed import MixedLora
from .predict import Predictor, load_predictor, predict

log = logging.getLogger("peftlab")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class AdapterSet:
    """Loaded adapters by name; ``shared_bytes`` is the weight memory held once instead of per adapter."""

    predictors: dict[str, Predictor]
    shared_bytes: int = 0
    mixer: Optional[MixedLora] = None  # the LoRA adapters that share forward passes (None: none can)
    # one forward at a time per adapter: predictors keep per-call state (a CRF head, a generation cache)
    _locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)

    def names(self) -> list[str]:
        return list(self.predictors)

    def get(self, name: str) -> Predictor:
        if name not in self.predictors:
            raise PeftlabError(f"adapter {name!r}: not loaded (loaded: {', '.join(self.predictors) or 'none'})")
        return self.predictors[name]

    def predict(self, name: str, inputs: Union[str, Iterable[Any]], batch_size: int = 32) -> list[dict]:
        """The rows ``peftlab predict`` gives for ``inputs`` on the adapter's folder."""
        predictor = self.get(name)
        with self._locks.setdefault(name, threading.Lock()):
            return predict(predictor, inputs, batch_size=batch_size)

    def predict_mixed(self, requests: Iterable[tuple[str, Any]], batch_size: int = 32) -> list[dict]:
        """Rows for ``(adapter, input)`` pairs in any mix, in input order: one batch per adapter, or, in a
        set loaded with ``shared_pass``, the LoRA adapters that can share the backbone pass
        (``peftlab.mixed``) together, ``batch_size`` rows per pass."""
        requests = list(requests)
        groups: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(requests):
            self.get(name)
            groups.setdefault(name, []).append(i)
        out: list[Optional[dict]] = [None] * len(requests)
        mixed = [n for n in groups if self.mixer is not None and n in self.mixer.members]
        if len(mixed) > 1:
            with contextlib.ExitStack() as held:
                for name in sorted(mixed):  # one order, so two callers never wait on each other
                    held.enter_context(self._locks.setdefault(name, threading.Lock()))
                rows = self.mixer.predict({n: [requests[i][1] for i in groups[n]] for n in mixed}, batch_size)
            for name in mixed:
                for i, row in zip(groups.pop(name), rows[name]):
                    out[i] = row
        for name, members in groups.items():
            for i, row in zip(members, self.predict(name, [requests[i][1] for i in members], batch_size)):
                out[i] = row
        return out  # type: ignore[return-value]

    def describe(self) -> list[dict]:
        """One entry per adapter: name, task, source folder and kind, labels, whether it joins mixed batches."""
        return [{"name": n, "task": p.task, "source": p.source, "path": str(p.path), "labels": list(p.labels),
                 "max_length": p.max_length, "mixed_batches": self.mixer is not None and n in self.mixer.members}
                for n, p in self.predictors.items()]


def adapter_names(paths: list[str]) -> list[tuple[str, Path]]:
    """``[name=]folder`` -> (name, folder); a bare folder is named after its last component."""
    out: list[tuple[str, Path]] = []
    for item in paths:
        name, sep, folder = str(item).partition("=")
        if not sep or not NAME.match(name):
            name, folder = Path(str(item)).resolve().name, str(item)
        if not NAME.match(name):
            raise PeftlabError(f"{item}: adapter name {name!r}: expected letters, digits, '_', '.' or '-' "
                               f"(at most 64); name it with NAME=FOLDER")
        if name in dict(out):
            raise PeftlabError(f"{item}: two adapters are named {name!r}; name them with NAME=FOLDER")
        out.append((name, Path(folder)))
    if not out:
        raise PeftlabError("no adapters given: expected one or more run, export or merged folders")
    return out


def load_adapters(paths: Iterable[Union[str, Path]], device: Optional[torch.device] = None,
                  shared_pass: bool = False) -> AdapterSet:
    """Load every ``[name=]folder`` (run, export or merged checkpoint) and hold their common weights once;
    with ``shared_pass``, also the peft model over which LoRA adapters share backbone passes."""
    index: dict[tuple, list[torch.Tensor]] = {}
    predictors: dict[str, Predictor] = {}
    shared = 0
    for name, folder in adapter_names([str(p) for p in paths]):
        predictor = load_predictor(folder, device=device)
        shared += share_weights(predictor.model, index)
        predictors[name] = predictor
    return AdapterSet(predictors, shared, _mixer(predictors) if shared_pass else None)


def _mixer(predictors: dict[str, Predictor]) -> Optional[MixedLora]:
    try:
        mixer = MixedLora(predictors)
    except (ValueError, TypeError, RuntimeError, KeyError, AttributeError) as exc:  # peft would not take them
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("adapters: LoRA adapters run one batch each (no mixed batches): %s", first[:200])
        return None
    return mixer if mixer.members else None


def _key(t: torch.Tensor) -> tuple:
    return (t.dtype, tuple(t.shape), t.device, tuple(t.detach().reshape(-1)[:8].tolist()))


def share_weights(model: torch.nn.Module, index: dict[tuple, list[torch.Tensor]]) -> int:
    """Point each float parameter of ``model`` equal to one in ``index`` at that tensor (the copy is
    freed); add the others to ``index``. Returns the bytes no longer held twice."""
    saved = 0
    with torch.no_grad():
        for p in model.parameters():
            if type(p) is not torch.nn.Parameter or not p.is_floating_point():
                continue  # bitsandbytes' quantized parameters carry state of their own
            candidates = index.setdefault(_key(p), [])
            same = next((q for q in candidates if q.data_ptr() == p.data_ptr() or torch.equal(q, p)), None)
            if same is None:
                candidates.append(p.data)
            elif same.data_ptr() != p.data_ptr():
                p.data = same
                saved += p.numel() * p.element_size()
    return saved
