"""``adapter``: bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) on a frozen backbone.

An adapter is a small residual MLP applied to the output ``h`` of a projection inside a transformer
layer, before that layer's own residual connection::

    h = proj(x);  h = h + up(act(down(h)))        down: d -> m,  up: m -> d,  m = d / reduction_factor

* ``placement: houlsby`` puts one after the attention output projection and one after the
  feed-forward output projection of every layer: ``2 * L * (2*d*m + m + d)`` parameters;
* ``placement: pfeiffer`` puts one after the feed-forward output projection only:
  ``L * (2*d*m + m + d)``.

The up-projection starts at zero, so an untrained adapter is the identity and the wrapped model
gives exactly the backbone's outputs. The adapter is attached as a child module ``adapter`` of the
projection it follows (``...attention.output.dense.adapter.down.weight``) and runs in a forward hook,
so the projection itself is untouched: it can be a bitsandbytes int8/nf4 ``Linear``.

Which projections: names relative to one transformer layer (``find_layers``), matched exactly (so
BERT's ``attention.output.dense`` is not mistaken for the layer's ``output.dense``). Defaults cover
BERT-like encoders (``attention.output.dense`` / ``output.dense``), Llama-like decoders
(``self_attn.o_proj`` / ``mlp.down_proj``) and a few other families; ``attention_module`` and
``ffn_module`` override them. Only the adapters, the task head and any ``modules_to_save`` train;
weights are saved as safetensors by the base class and loading re-applies the adapters to a fresh
backbone.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..backbones import find_layers
from ..errors import PeftlabError
from . import Method, MethodContext, check_modules_to_save, prepare_quantized, register_method

# Candidate names, relative to one transformer layer, tried in order (first match wins).
ATTENTION_OUTPUT_CANDIDATES = (
    "attention.output.dense",  # BERT, RoBERTa, ELECTRA, XLM-R (MiniLM)
    "self_attn.o_proj",  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "attention.dense",  # GPT-NeoX, Pythia
    "attn.c_proj",  # GPT-2
    "self_attn.out_proj",  # OPT, BART
    "attention.out_lin",  # DistilBERT
    "self_attention.dense",  # Falcon, BLOOM
)
FFN_OUTPUT_CANDIDATES = (
    "output.dense",  # BERT, RoBERTa, ELECTRA, XLM-R (MiniLM)
    "mlp.down_proj",  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "mlp.dense_4h_to_h",  # GPT-NeoX, Falcon, BLOOM
    "mlp.c_proj",  # GPT-2
    "fc2",  # OPT, BART
    "ffn.lin2",  # DistilBERT
)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby",
        description="houlsby: after the attention output and the feed-forward output of every layer; "
        "pfeiffer: after the feed-forward output only.",
    )
    reduction_factor: int = Field(
        16, gt=0, description="Bottleneck size m = hidden size // reduction_factor."
    )
    non_linearity: Literal["relu", "gelu", "swish", "silu", "tanh"] = Field(
        "relu", description="Activation between the down- and the up-projection."
    )
    attention_module: Optional[str] = Field(
        None,
        description="Attention output projection, relative to one layer (e.g. attention.output.dense, "
        "self_attn.o_proj); default: detected from the architecture.",
    )
    ffn_module: Optional[str] = Field(
        None,
        description="Feed-forward output projection, relative to one layer (e.g. output.dense, "
        "mlp.down_proj); default: detected from the architecture.",
    )
    modules_to_save: list[str] = Field(
        [], description="More modules trained in full and saved with the adapters (the task head always is), "
        "e.g. [pooler]."
    )


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))`` with ``up`` zero-initialised (the identity until trained)."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)
        return (x + self.up(self.act(self.down(x)))).to(h.dtype)


def _adapter_hook(module: nn.Module, inputs: Any, output: Any) -> Any:
    adapter = module.adapter
    if isinstance(output, tuple):  # projections that return (hidden, bias) or similar
        return (adapter(output[0]),) + tuple(output[1:])
    return adapter(output)


def output_features(module: nn.Module, where: str) -> int:
    """The output width of a projection (nn.Linear, bitsandbytes Linear, GPT-2's Conv1D)."""
    for attr in ("out_features", "nf"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    raise PeftlabError(f"method.{where}: {type(module).__name__} is not a linear projection (no out_features)")


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def resolve_targets(layer: nn.Module, options: AdapterOptions) -> list[tuple[str, str]]:
    """(option key, module name relative to a layer) of the projections an adapter follows."""
    names = {n for n, _ in layer.named_modules() if n}
    wanted = [("ffn_module", options.ffn_module, FFN_OUTPUT_CANDIDATES)]
    if options.placement == "houlsby":
        wanted.insert(0, ("attention_module", options.attention_module, ATTENTION_OUTPUT_CANDIDATES))
    linear_names = sorted(
        n for n, m in layer.named_modules() if n and (isinstance(m, nn.Linear) or hasattr(m, "out_features"))
    )
    targets = []
    for key, given, candidates in wanted:
        if given is not None:
            if given not in names:
                raise PeftlabError(
                    f"method.{key}: no module '{given}' in a transformer layer ({type(layer).__name__}); "
                    f"its linear modules: {', '.join(linear_names)}"
                )
            targets.append((key, given))
            continue
        found = next((c for c in candidates if c in names), None)
        if found is None:
            raise PeftlabError(
                f"method.{key}: cannot detect the {'attention' if key == 'attention_module' else 'feed-forward'} "
                f"output projection of {type(layer).__name__}; set method.{key} to one of its linear "
                f"modules: {', '.join(linear_names)}"
            )
        targets.append((key, found))
    return targets


def add_adapters(model: nn.Module, options: AdapterOptions) -> list[str]:
    """Attach an adapter after every target projection; returns the full module names adapted."""
    layers = find_layers(model)
    targets = resolve_targets(layers[0], options)
    layers_name = next(n for n, m in model.named_modules() if m is layers)
    adapted = []
    for i, layer in enumerate(layers):
        for key, rel in targets:
            try:
                proj = layer.get_submodule(rel)
            except AttributeError:
                raise PeftlabError(f"method.{key}: layer {i} has no module '{rel}'") from None
            if hasattr(proj, "adapter"):
                raise PeftlabError(f"method.{key}: {layers_name}.{i}.{rel} already has an adapter")
            hidden = output_features(proj, key)
            bottleneck = hidden // options.reduction_factor
            if bottleneck < 1:
                raise PeftlabError(
                    f"method.reduction_factor: {options.reduction_factor} leaves no bottleneck for hidden size "
                    f"{hidden}; expected at most {hidden}"
                )
            adapter = BottleneckAdapter(hidden, bottleneck, options.non_linearity)
            proj.adapter = adapter.to(_module_device(proj))
            proj.register_forward_hook(_adapter_hook)
            adapted.append(f"{layers_name}.{i}.{rel}")
    return adapted


@register_method
class Adapter(Method):
    name = "adapter"
    description = "bottleneck adapters (Houlsby or Pfeiffer placement) on a frozen backbone; head trained"
    Options = AdapterOptions
    can_merge = False
    supports_quantization = True

    def apply(self, model: Any, ctx: MethodContext) -> Any:
        extra = check_modules_to_save(model, self.options.modules_to_save)
        model = prepare_quantized(model, ctx)
        for p in model.parameters():
            p.requires_grad_(False)
        add_adapters(model, self.options)
        self.train_head(model, ctx)
        for module in extra:  # floating point: check_modules_to_save made sure
            for p in module.parameters():
                p.requires_grad_(True)
        return model
