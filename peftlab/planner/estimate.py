"""The estimator behind ``plan``: one recipe's data, base memory and weights, measured once; one trace
per setting (batch size, checkpointing, evaluation batch)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .. import dropout as fast_dropout
from ..errors import PeftlabError
from .result import Component, Plan
from .build import (TimingBatches, apply_method, batch_of, later_batch, layer_count, load_data, longest_eval,
                    meta_model, model_config, shallow_model, timing_batches)
from .trace import Trace, TraceInputs, trace
from .weights import count_weights, quantizable_weights

# What a CPU run holds beyond the base process, the weights and the tensors the trace counts (the
# loop's loaders and logs, heap blocks freed but kept, the autograd graph's own objects): measured
# on this project's runs, where it was about constant across methods (benchmarks/README.md, the
# planner; benchmarks/planner_accuracy.py compares every prediction with a real run).
RUN_OVERHEAD_BYTES = 100 * 2**20


class Estimator:
    def __init__(self, recipe: Any, device: Optional[str] = None):
        from ..backbones import resolve_backbone
        from ..system import current_rss_bytes
        from ..util import default_device

        self.recipe = recipe
        self.device = torch.device(device) if device else default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise PeftlabError("--device cuda: this machine has no CUDA device (the planner measures on the device it plans for)")
        if self.device.type == "cpu":  # the step time is measured with the threads a run uses
            from ..system import run_threads

            torch.set_num_threads(run_threads(recipe.train.num_threads))
        if recipe.backbone.quantization != "none":
            warm_up_quantized(recipe.backbone.quantization, self.device)
        self.data = load_data(recipe)
        self.path = resolve_backbone(recipe.backbone)
        self.config = model_config(recipe, self.data.task, self.data.tokenizer, self.path)
        self.layers = layer_count(self.config)
        self.weights = self._count_weights()  # builds the model's modules: its code is imported now
        self.base_bytes = current_rss_bytes() if self.device.type == "cpu" else 0
        self._traces: dict[tuple, Trace] = {}
        self._batches: dict[int, tuple[dict, Optional[dict], TimingBatches]] = {}

    def _count_weights(self) -> Any:
        from ..backbones import unquantized_modules

        r, task = self.recipe, self.data.task
        bare = meta_model(r, task, self.config)
        self.checkpointable = bool(getattr(bare, "supports_gradient_checkpointing", False))
        quant = r.backbone.quantization
        skip = unquantized_modules(r.backbone, task.auto_model, task.model_kwargs(), self.path) if quant != "none" else []
        quantized = quantizable_weights(bare, quant, skip)
        model, trainable = apply_method(r, task, bare)
        return count_weights(model, trainable, quantized, quant, r.backbone.double_quant, getattr(torch, r.backbone.dtype))

    def supports_checkpointing(self) -> bool:
        return self.checkpointable

    def available_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free)
        from ..system import available_memory_bytes

        return available_memory_bytes() + self.base_bytes  # this process's own memory is the run's too

    def trace_for(self, batch_size: int, checkpointing: bool, eval_batch_size: int, timed: bool = True) -> Trace:
        """The setting's trace (cached); ``timed=False`` skips the timed steps (a fit's candidates)."""
        key = (batch_size, checkpointing, eval_batch_size)
        cached = self._traces.get(key)
        if cached is None or (timed and math.isnan(cached.step_s)):
            inputs = self.trace_inputs(batch_size, checkpointing, eval_batch_size)
            with torch.random.fork_rng(devices=[]):
                self._traces[key] = trace(inputs, self.layers, timed_steps=2 if timed else 0)
        return self._traces[key]

    def trace_inputs(self, batch_size: int, checkpointing: bool, eval_batch_size: int) -> TraceInputs:
        from ..training.optim import make_optimizer

        r, data, task, device = self.recipe, self.data, self.data.task, self.device
        longest, later, timing = self.train_batches(batch_size)

        def build(layers: int) -> tuple[Any, dict]:
            model, trainable = shallow_model(r, task, self.config, layers, device)
            fast_dropout.install_for_run(model, r.train.cpu_fast_dropout, device)  # as training runs it
            return model.to(device), trainable

        def on_device(batch: Optional[dict]) -> Optional[dict]:
            return None if batch is None else {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

        return TraceInputs(
            build=build,
            loss=task.training_loss,
            evaluate=self._evaluate,
            longest=on_device(longest),
            later=on_device(later),
            timing=[on_device(b) for b in timing.batches],
            timing_sizes=timing.sizes,
            epoch_size=timing.epoch_size,
            eval_batch=on_device(longest_eval(data, eval_batch_size)),
            optimizer=lambda params: make_optimizer(None, params, r, []),
            gradient_checkpointing=checkpointing,
            max_grad_norm=r.train.max_grad_norm,
        )

    def train_batches(self, batch_size: int) -> tuple[dict, Optional[dict], TimingBatches]:
        """The longest training batch of ``batch_size``, the largest one a run trains on with optimizer
        state (None: the longest) and the batches the step time is measured on."""
        if batch_size not in self._batches:
            self._batches[batch_size] = (batch_of(self.data, self.data.train, batch_size),
                                         later_batch(self.data, self.recipe, batch_size),
                                         timing_batches(self.data, self.recipe, batch_size))
        return self._batches[batch_size]

    def _evaluate(self, model: Any, batch: dict) -> None:
        task = self.data.task
        with torch.no_grad():
            task.loss_sum(model, batch)
            if hasattr(task, "generate_ids") and "_prompt_ids" in batch:
                config = task.generation_config(model, self.data.tokenizer)
                task.generate_ids(model, batch["_prompt_ids"], batch["_prompt_mask"], config)

    def plan_for(self, batch_size: int, grad_accum: int, checkpointing: bool, eval_batch_size: int,
                 budget: Optional[int] = None, timed: bool = True) -> Plan:
        t = self.trace_for(batch_size, checkpointing, eval_batch_size, timed)
        w = self.weights
        grads, optim = w.trainable_bytes, 2 * w.trainable_bytes  # AdamW: exp_avg and exp_avg_sq
        peaks = {phase: t.peak(phase) for phase in ("train", "step", "eval")}
        phase = max(peaks, key=peaks.get)
        slack = RUN_OVERHEAD_BYTES if self.device.type == "cpu" else 0
        longest_batch, later, timing = self.train_batches(batch_size)
        longest = longest_batch["input_ids"].shape[-1]
        after = "" if later is None else f" (first, before any optimizer state; then up to {later['input_ids'].shape[-1]})"
        components = [
            Component("process before the weights", self.base_bytes, "imports (the model's code too), tokenizer, data (measured)"),
            Component("frozen weights", w.frozen_bytes, self._weight_note()),
            Component("trainable parameters", w.trainable_bytes, f"{w.trainable_params:,} of {w.total_params:,}"),
            Component("gradients", grads, "one per trainable parameter"),
            Component("optimizer state", optim, "AdamW: two per trainable parameter"),
            Component("activations", max(0, peaks["train"] - grads - optim),
                      f"forward + backward, longest batch {batch_size} x {longest} tokens{after}"
                      + (", checkpointed" if checkpointing else "")),
            Component("evaluation pass", max(0, peaks["eval"] - optim), f"batch {eval_batch_size}, no gradients"),
            Component("run overhead", slack, "loaders, logs, freed heap, autograd objects (measured here)"),
        ]
        load = self.base_bytes + w.frozen_bytes + w.trainable_bytes
        step_s = t.step_s
        tokens = timing.epoch_tokens
        return Plan(
            recipe=self.recipe.source, device=self.device.type, batch_size=batch_size, grad_accum=grad_accum,
            eval_batch_size=eval_batch_size, gradient_checkpointing=checkpointing, components=components,
            peak_bytes=load + peaks[phase] + slack, peak_phase=phase, load_bytes=load,
            samples_per_s=batch_size / step_s, tokens_per_s=tokens / step_s, budget_bytes=budget,
            notes=self._notes(),
        )

    def _weight_note(self) -> str:
        w, r = self.weights, self.recipe
        if r.backbone.quantization == "none":
            return r.backbone.dtype
        return f"{w.quantized_params:,} parameters in {r.backbone.quantization}, the rest {r.backbone.dtype}"

    def _notes(self) -> list[str]:
        notes = []
        if self.device.type == "cuda":
            notes.append("cuda: device memory of tensors only (no CUDA context, no host memory); "
                         "the speed is the trace's, measured on this machine's device")
        return notes


def warm_up_quantized(quantization: str, device: Any) -> None:
    """One step through a small bitsandbytes layer: what its first use loads (bitsandbytes and its
    kernels) is part of a quantized run's memory before its weights."""
    import bitsandbytes as bnb

    layer = (bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False) if quantization == "int8"
             else bnb.nn.Linear4bit(64, 64, quant_type=quantization, compute_dtype=torch.float32))
    layer = layer.to(device)
    x = torch.randn(2, 64, device=device, requires_grad=True)
    layer(x).sum().backward()
