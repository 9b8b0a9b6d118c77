"""Measure a recipe's tensor memory and step time on shallow copies of its backbone.

The backbone's config is instantiated with 2 and with 3 layers (random weights, the recipe's method
applied, the real longest batch of its data). Every tensor created during a training step, the
optimizer step and an evaluation pass is counted while it is alive; the difference between the two
depths is one layer's share, so the full depth is ``one + (layers - 1) * (two - one)``. This counts
what autograd really saves for the method (frozen paths, dropout masks, prefix keys and values,
checkpointing), not a rule of thumb. The step time is extrapolated the same way from depth 2 and a
copy up to four layers deeper (see :func:`trace`).

A training step's peak moves with depth: a shallow model peaks at the end of the backward (its
gradients), a deep one at the start (every layer's activations). So the peak up to the moment the
backward leaves the top layer is extrapolated on its own ("early"), and the larger of the two counts.
"""

from __future__ import annotations

import math
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PHASES = ("train", "step", "eval")  # forward + backward, optimizer step, evaluation pass
EARLY = "early"  # forward + the backward through the head and the top layer (a part of "train")


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode that are still alive, and their peak per phase.

    Storages present before (``static``: parameters, buffers, inputs) are not counted."""

    def __init__(self, static: set[int]):
        super().__init__()
        self.static = static
        self.live = 0
        self.phase = "train"
        self.early = False  # also counting into the EARLY peak
        self.peaks: dict[str, int] = dict.fromkeys((*PHASES, EARLY), 0)
        self._keys: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._keys.discard(key)

    def start(self, phase: str) -> None:
        self.phase = phase
        self.early = phase == "train"
        self._peak()

    def end_early(self) -> None:
        self.early = False

    def _peak(self) -> None:
        self.peaks[self.phase] = max(self.peaks[self.phase], self.live)
        if self.early:
            self.peaks[EARLY] = max(self.peaks[EARLY], self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._keys and key not in self.static:
                    n = storage.nbytes()
                    self._keys.add(key)
                    self.live += n
                    weakref.finalize(storage, self._free, key, n)
        self._peak()
        return out


def storage_keys(tensors: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


@dataclass
class DepthTrace:
    """One shallow model's measurements."""

    layers: int
    peaks: dict[str, int]  # bytes alive at each phase's peak (parameters not included)
    step_s: float  # seconds per training step (forward, backward, clipping, optimizer), mean over the timed batches


@dataclass
class Trace:
    """Both depths, extrapolated to the backbone's ``layers``."""

    layers: int
    one: DepthTrace
    two: DepthTrace
    timed: DepthTrace  # the deeper of the two timed copies (``two`` itself when no deeper one is timed)

    def extrapolate(self, one: float, two: float, two_layers: Optional[int] = None) -> float:
        if self.layers <= self.one.layers:
            return one
        two_layers = two_layers or self.two.layers
        return one + (self.layers - self.one.layers) * (two - one) / (two_layers - self.one.layers)

    def peak(self, phase: str) -> int:
        def at_depth(key: str) -> float:
            return self.extrapolate(self.one.peaks[key], self.two.peaks[key])

        value = max(at_depth("train"), at_depth(EARLY)) if phase == "train" else at_depth(phase)
        return max(0, int(value))

    @property
    def step_s(self) -> float:
        return max(self.one.step_s, self.extrapolate(self.one.step_s, self.timed.step_s, self.timed.layers))


@dataclass
class TraceInputs:
    """What a shallow trace needs from the recipe: how to build the model and run its steps."""

    build: Callable[[int], tuple[Any, Any]]  # layers -> (model, trainable parameters)
    loss: Callable[[Any, dict], torch.Tensor]  # the task's training loss
    evaluate: Callable[[Any, dict], Any]  # one evaluation batch through the model (no_grad inside)
    longest: dict  # the training batch of the longest examples (padded as training pads it)
    later: Optional[dict]  # the largest batch trained with optimizer state (None: the longest again)
    timing: list  # training batches as an epoch forms them (for the step time)
    eval_batch: Optional[dict]  # the evaluation batch of the longest examples
    optimizer: Callable[[list], Any]
    gradient_checkpointing: bool = False
    max_grad_norm: Optional[float] = None  # clipped as the run clips
    timing_sizes: Optional[list] = None  # the timing batches' padded sizes (examples x longest)
    epoch_size: Optional[float] = None  # the epoch's mean padded size: the step time is read there


def _trainable_copy(inputs: TraceInputs, layers: int) -> tuple[Any, Any, Callable[[], Any]]:
    """The backbone at ``layers`` layers in training mode, its optimizer and the run's clipping."""
    torch.manual_seed(0)
    model, params = inputs.build(layers)
    if inputs.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    clip = (lambda: torch.nn.utils.clip_grad_norm_(list(params.values()), inputs.max_grad_norm)) \
        if inputs.max_grad_norm else (lambda: None)
    return model, inputs.optimizer(params), clip


def time_depth(inputs: TraceInputs, layers: int, timed_steps: int) -> DepthTrace:
    """Step time only (no memory trace) of a copy with ``layers`` layers."""
    model, optimizer, clip = _trainable_copy(inputs, layers)
    return DepthTrace(layers, {}, time_steps(inputs, model, optimizer, clip, timed_steps))


def trace_depth(inputs: TraceInputs, layers: int, timed_steps: int = 2) -> DepthTrace:
    model, optimizer, clip = _trainable_copy(inputs, layers)
    state = list(model.parameters()) + list(model.buffers())
    batches = [b for b in (inputs.longest, inputs.later, *inputs.timing, inputs.eval_batch) if b is not None]
    static = storage_keys(state) | storage_keys(v for b in batches for v in b.values())
    with LiveTensors(static) as live, on_top_layer_backward(model, layers, live.end_early):
        # the second step runs with the optimizer state the first created
        for batch in (inputs.longest, inputs.later or inputs.longest):
            live.start("train")
            inputs.loss(model, batch).backward()
            live.start("step")
            clip()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if inputs.eval_batch is not None:
            live.start("eval")
            model.eval()
            inputs.evaluate(model, inputs.eval_batch)
            model.train()
    return DepthTrace(layers, dict(live.peaks), time_steps(inputs, model, optimizer, clip, timed_steps))


@contextmanager
def on_top_layer_backward(model: Any, layers: int, callback: Callable[[], None]) -> Iterator[None]:
    """Calls ``callback`` when a backward pass has gone through the model's top layer (the gradient
    of that layer's input is computed); no call where that input needs no gradient."""
    top = next((m[-1] for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers), None)
    if top is None:
        yield
        return

    def pre_hook(_module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda _grad: callback())

    handle = top.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def time_steps(inputs: TraceInputs, model: Any, optimizer: Any, clip: Callable, repeats: int) -> float:
    """Mean seconds per step over the timing batches, each the fastest of ``repeats`` (after a warm-up
    step); NaN when ``repeats`` is 0."""
    if not repeats:
        return math.nan

    def step(batch: dict) -> float:
        start = time.perf_counter()
        inputs.loss(model, batch).backward()
        clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(inputs.timing[0])
    best = [min(step(batch) for _ in range(repeats)) for batch in inputs.timing]
    return step_at(inputs.timing_sizes, best, inputs.epoch_size)


def step_at(sizes: Optional[list], times: list[float], size: Optional[float]) -> float:
    """The step time at ``size`` padded tokens: the least-squares line through the timed batches'
    (size, time); their mean time where no line can be fitted (no sizes, one size, a falling line)."""
    mean_t = sum(times) / len(times)
    if size is None or not sizes or len(set(sizes)) < 2:
        return mean_t
    mean_x = sum(sizes) / len(sizes)
    slope = (sum((x - mean_x) * (t - mean_t) for x, t in zip(sizes, times))
             / sum((x - mean_x) ** 2 for x in sizes))
    return mean_t + slope * (size - mean_x) if slope > 0 else mean_t


TIMED_SPAN = 4  # layers between the two timed copies: one layer's time is a small difference of two noisy ones


def trace(inputs: TraceInputs, layers: int, timed_steps: int = 2) -> Trace:
    """Memory at depths 2 and 3 (1 and 2 for a 2-layer model): at one layer the peak can fall elsewhere
    in the step. Time at depth 2 and up to ``TIMED_SPAN`` layers deeper (the backbone's own depth at most)."""
    low = max(1, min(2, layers - 1))
    deep = min(layers, low + TIMED_SPAN)
    one = trace_depth(inputs, low, timed_steps)
    two = trace_depth(inputs, low + 1, timed_steps if deep == low + 1 else 0)
    timed = time_depth(inputs, deep, timed_steps) if timed_steps and deep > low + 1 else two
    return Trace(layers, one, two, timed)
