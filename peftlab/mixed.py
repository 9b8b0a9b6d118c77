"""Batches that mix LoRA adapters in one forward pass (``AdapterSet.predict_mixed``, ``peftlab serve``).

peft runs the rows of one batch through different LoRA adapters (``adapter_names``), but on one
model, and runs of different tasks have different heads (peft issue 1960). So the backbone runs once
for the whole batch: a peft model over the bare backbone, built on the runs' shared frozen tensors,
holds each mixable run's LoRA weights (the same tensors, not copies) as an adapter of its own, and
each row goes through its run's adapter. Each run's own model then applies its head to its rows'
hidden states (its backbone swapped, for that call, for one that returns them), so a classifier, a
pooler-based head, a QA head or a CRF computes what it computes when the run is loaded alone.

A run is mixable when it is a plain peft LoRA (no DoRA, not quantized, nothing trained inside the
backbone but LoRA) of a task that predicts through plans (:class:`~peftlab.tasks.Plan`), on the same
backbone tensors as the others. Other runs are run on their own.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from .predict import Predictor, forward, plans_of
from .tasks import Plan
from .util import is_bnb_model

INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a mixed forward pass takes


class _Given(torch.nn.Module):
    """Stands in for a model's backbone for one call: returns the output it holds."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@contextlib.contextmanager
def _backbone_given(model: Any, output: Any) -> Iterator[None]:
    prefix = model.base_model_prefix
    own = model._modules[prefix]
    model._modules[prefix] = _Given(output)
    try:
        yield
    finally:
        model._modules[prefix] = own


def _lora_backbone(p: Predictor) -> Optional[tuple[Any, torch.nn.Module]]:
    """(the run's transformers model, its backbone) when the run can join a mixed batch, else None."""
    from peft import LoraConfig, PeftModel

    if not isinstance(p.model, PeftModel) or list(p.model.peft_config) != ["default"] or is_bnb_model(p.model):
        return None
    config = p.model.peft_config["default"]
    if not isinstance(config, LoraConfig) or config.use_dora or plans_of(p) is None:
        return None
    if getattr(p.tokenizer, "padding_side", "right") != "right":
        return None
    model = p.model.get_base_model()
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(backbone, torch.nn.Module) or any(
            "modules_to_save" in n or "original_module" in n for n, _ in backbone.named_parameters()):
        return None  # something other than LoRA trained inside the backbone
    return model, backbone


def _frozen(backbone: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The backbone's own weights by their name without peft's wrapping (``.base_layer``)."""
    return {n.replace(".base_layer", ""): q for n, q in backbone.named_parameters() if ".lora_" not in n}


def _on_backbone(config: Any, prefix: str) -> Any:
    """The config's module names as the bare backbone names them (peft saves ``bert.encoder...``)."""
    def strip(name: str) -> str:
        return name.removeprefix(prefix + ".")

    if isinstance(config.target_modules, (list, set)):
        config.target_modules = {strip(t) for t in config.target_modules}
    config.rank_pattern = {strip(k): v for k, v in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {strip(k): v for k, v in (config.alpha_pattern or {}).items()}
    return config


def _set_param(root: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    root.get_submodule(owner)._parameters[leaf] = param


class MixedLora:
    """Mixable runs (by adapter name) on one peft model over their shared backbone."""

    def __init__(self, predictors: dict[str, Predictor]):
        self.members: dict[str, tuple[str, Predictor, Any]] = {}  # name -> (peft adapter name, predictor, model)
        shared: dict[str, torch.nn.Parameter] = {}
        first: Optional[torch.nn.Module] = None
        for name, p in predictors.items():
            found = _lora_backbone(p)
            if found is None:
                continue
            model, backbone = found
            own = _frozen(backbone)
            if first is not None and (type(backbone) is not type(first) or any(
                    k in shared and shared[k].data_ptr() != q.data_ptr() for k, q in own.items())):
                continue  # another backbone, or weights of its own: runs alone
            first = first or backbone
            for k, q in own.items():
                shared.setdefault(k, q)
            self.members[name] = (f"m{len(self.members)}", p, model)
        self.trunk = self._trunk(first, shared) if len(self.members) > 1 else None
        if self.trunk is None:
            self.members = {}

    def _trunk(self, first: torch.nn.Module, shared: dict[str, torch.nn.Parameter]) -> Any:
        """A peft model over the bare backbone (the members' tensors) with each member's LoRA weights."""
        from peft import get_peft_model

        from .methods.lora import headless_lora_config

        some = next(iter(shared.values()))
        base = type(first)(first.config).to(device=some.device, dtype=some.dtype)  # weights replaced below
        for name, _ in list(base.named_parameters()):
            if name in shared:
                _set_param(base, name, shared[name])
        trunk = None
        for adapter, p, model in self.members.values():
            config = _on_backbone(headless_lora_config(p.model.peft_config["default"]), model.base_model_prefix)
            if trunk is None:
                trunk = get_peft_model(base, config, adapter_name=adapter)
            else:
                trunk.add_adapter(adapter, config)
        params = dict(trunk.get_base_model().named_parameters())
        for adapter, _, model in self.members.values():
            backbone = getattr(model, model.base_model_prefix)
            for n, q in backbone.named_parameters():
                if ".lora_" in n:
                    target = n.replace(".default.", f".{adapter}.")
                    if target not in params or params[target].shape != q.shape:
                        return None  # peft laid this run's LoRA out differently: it runs alone
                    _set_param(trunk.get_base_model(), target, q)
        return trunk.eval()

    def can_run(self, batch: dict) -> bool:
        return set(batch) <= set(INPUTS) and "input_ids" in batch

    @torch.no_grad()
    def forward(self, parts: list[tuple[str, dict]]) -> list[Any]:
        """Each ``(adapter, inputs)`` part's model output, the backbone run once for all of them."""
        length = max(b["input_ids"].shape[1] for _, b in parts)
        stacked = {k: torch.cat([_padded(b, k, length) for _, b in parts]).to(self.device) for k in INPUTS}
        names = [self.members[a][0] for a, b in parts for _ in range(b["input_ids"].shape[0])]
        hidden = self.trunk(**stacked, adapter_names=names)
        outputs, row = [], 0
        for adapter, batch in parts:
            n, width = batch["input_ids"].shape
            own = type(hidden)(**{k: (v[row:row + n, :width] if k == "last_hidden_state" else v[row:row + n])
                                  for k, v in hidden.items() if v is not None})
            _, p, model = self.members[adapter]
            with _backbone_given(model, own):
                outputs.append(model(**{k: v.to(p.device) for k, v in batch.items()}))
            row += n
        return outputs

    @property
    def device(self) -> torch.device:
        return next(iter(self.members.values()))[1].device

    def predict(self, inputs: dict[str, list], batch_size: int) -> dict[str, list[dict]]:
        """Rows per adapter for its inputs; batches of every adapter packed into shared forward passes
        (up to ``batch_size`` rows each, longest first)."""
        plans = {a: list(plans_of(self.members[a][1])(items, batch_size)) for a, items in inputs.items()}
        work = [(a, plan, j, b) for a, ps in plans.items() for plan in ps for j, b in enumerate(plan.batches)]
        for pack in _packs(sorted(work, key=lambda w: -w[3]["input_ids"].shape[1]), batch_size):
            shared = [w for w in pack if self.can_run(w[3])]
            for (_, plan, j, _), out in zip(shared, self.forward([(w[0], w[3]) for w in shared]) if shared else []):
                plan.take(j, out)
            for a, plan, j, batch in pack:
                if not self.can_run(batch):
                    plan.take(j, forward(self.members[a][1], batch))
        return {a: _rows(ps, len(inputs[a])) for a, ps in plans.items()}


def _padded(batch: dict, key: str, length: int) -> torch.Tensor:
    """``batch[key]`` right-padded to ``length`` (zeros; masked); a missing token_type_ids is all 0
    (what the model assumes without it), a missing attention mask all 1 over the batch's own width."""
    ids = batch["input_ids"]
    value = batch.get(key)
    if value is None:
        value = torch.ones_like(ids) if key == "attention_mask" else torch.zeros_like(ids)
    return F.pad(value, (0, length - value.shape[1]))


def _packs(work: list, batch_size: int) -> Iterator[list]:
    pack, rows = [], 0
    for w in work:
        n = w[3]["input_ids"].shape[0]
        if pack and rows + n > batch_size:
            yield pack
            pack, rows = [], 0
        pack.append(w)
        rows += n
    if pack:
        yield pack


def _rows(plans: list[Plan], n: int) -> list[dict]:
    out: list[Optional[dict]] = [None] * n
    for plan in plans:
        plan.place(out)
    return out  # type: ignore[return-value]
