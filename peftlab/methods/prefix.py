"""``prefix``: prefix tuning (Li & Liang 2021; "deep prompts" of P-tuning v2) on a frozen backbone.

Every self-attention layer gets ``P = num_virtual_tokens`` trainable key and value vectors per
key/value head. Real queries attend to these ``P`` prefix positions in addition to the real keys;
nothing else changes: the prefix has no position (no position embedding, no RoPE), takes no
output slot (logits keep the input's length, so token classification works) and is not stored in
the generation cache (``generate()`` works as for the bare model).

Why a peftlab implementation: peft 0.21.2's prefix tuning passes its prefix as ``past_key_values``,
which BERT renamed ``cache`` in transformers 5.x (it fails), a pre-filled cache would also shift
BERT's positions, and prompt tuning adds virtual tokens to the output (token classification
breaks). Here the prefix is injected at the one call every transformers 5 attention layer makes,
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)``:

* each targeted attention module gets a config *view* whose ``_attn_implementation`` names the
  registered function ``peftlab_prefix`` (everything else reads through to the real config, so the
  model's masks are still built for its real implementation, sdpa or eager);
* ``peftlab_prefix`` prepends the layer's prefix keys/values to ``key``/``value`` (after the cache
  update, after RoPE), prepends ``P`` always-visible columns to the attention mask (bool ``True`` or
  additive ``0``; a causal mask is made explicit when sdpa would have used ``is_causal``), and calls
  the real implementation (``sdpa``, or the model's own ``eager_attention_forward``).

Parameters: ``L x 2 x P x n_kv x head_dim`` (= ``L x 2 x P x d`` without grouped-query attention).
With ``reparameterize: true`` the prefix is ``MLP(E)`` (E: ``P x d`` embedding, MLP
``d -> encoder_hidden_size -> tanh -> L*2*n_kv*head_dim``) during training; the saved model holds
only the computed prefix (plus the head), which is all prediction needs.

Zero prefix (keys and values 0): each real query gets ``P`` extra logits of exactly 0 and values 0,
so every attention output is the bare one scaled by ``Z / (Z + P)``, with ``Z = sum_j exp(s_j)``
over the keys that query may see (``s_j`` its scaled logits). ``prefix_disabled(model)`` switches
the prefix off: outputs are then exactly the bare backbone's.
"""

from __future__ import annotations

import copy
import inspect
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..backbones import find_layers
from ..errors import PeftlabError
from . import STATE_FILE, Method, MethodContext, load_trainable_state, prepare_quantized, register_method

PREFIX_IMPLEMENTATION = "peftlab_prefix"
ENCODER_NAME = "peftlab_prefix"
SLOT_ATTR = "_peftlab_prefix_slot"
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")

# Self-attention module names relative to one transformer layer, tried in order.
ATTENTION_CANDIDATES = (
    "attention.self",  # BERT, RoBERTa, ELECTRA, XLM-R (MiniLM); before "attention" (BERT has both)
    "self_attn",  # Llama, Mistral, Qwen2, Gemma, Phi-3, OPT, BART
    "attn",  # GPT-2
    "self_attention",  # Falcon, BLOOM
    "attention",  # GPT-NeoX
)


class PrefixOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(20, gt=0, description="Prefix length P (key/value vectors per layer).")
    reparameterize: bool = Field(
        False, description="Train the prefix through an MLP (Li & Liang 2021); only the prefix is saved."
    )
    encoder_hidden_size: int = Field(512, gt=0, description="Hidden size of the reparameterisation MLP.")
    init_std: float = Field(
        0.02, ge=0, description="Std of the random normal init of the prefix (without reparameterize)."
    )
    init: Literal["random", "vocab"] = Field(
        "random",
        description="random: normal(0, init_std); vocab: the keys and values the frozen model computes for "
        "P tokens drawn from its vocabulary (real-word activations, Li & Liang 2021; without reparameterize).",
    )
    attention_module: Optional[str] = Field(
        None,
        description="Self-attention module relative to one layer (e.g. attention.self, self_attn); "
        "default: detected from the architecture.",
    )

    @model_validator(mode="after")
    def _init_needs_direct_prefix(self) -> "PrefixOptions":
        if self.init == "vocab" and self.reparameterize:
            raise ValueError("init 'vocab' sets the prefix itself; it cannot be used with reparameterize: true")
        return self


# ---------------------------------------------------------------------------------- the parameters


class PrefixEncoder(nn.Module):
    """Holds (or computes) the prefix of every layer: ``layer_kv(i)`` is ``(2, n_kv, P, head_dim)``."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, options: PrefixOptions, embed_dim: int):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.num_virtual_tokens = options.num_virtual_tokens
        self.reparameterize = options.reparameterize
        self.enabled = True
        P = options.num_virtual_tokens
        if self.reparameterize:
            self.embedding = nn.Parameter(torch.randn(P, embed_dim))
            self.mlp = nn.Sequential(
                nn.Linear(embed_dim, options.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(options.encoder_hidden_size, layers * self.width),
            )
        else:
            shape = (layers, 2, kv_heads, P, head_dim)  # init 'vocab' fills it in after the model is wired
            self.prefix = nn.Parameter(torch.zeros(shape) if options.init == "vocab" else torch.randn(shape) * options.init_std)

    @property
    def width(self) -> int:
        """Values per prefix position and layer: keys and values of every key/value head."""
        return 2 * self.kv_heads * self.head_dim

    def _to_layout(self, out: torch.Tensor, layers: int) -> torch.Tensor:
        # (P, layers * 2 * n_kv * hd) -> (layers, 2, n_kv, P, hd)
        P = out.shape[0]
        return out.view(P, layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    def layer_kv(self, index: int) -> torch.Tensor:
        if not self.reparameterize:
            return self.prefix[index]
        hidden = self.mlp[1](self.mlp[0](self.embedding))
        last = self.mlp[2]
        rows = slice(index * self.width, (index + 1) * self.width)
        out = nn.functional.linear(hidden, last.weight[rows], last.bias[rows])
        return self._to_layout(out, 1)[0]

    def export(self) -> torch.Tensor:
        """The prefix of every layer, ``(L, 2, n_kv, P, head_dim)``: what prediction needs."""
        if not self.reparameterize:
            return self.prefix.detach()
        with torch.no_grad():
            return self._to_layout(self.mlp(self.embedding), self.layers).contiguous()


class _Slot:
    """Kept in an attention module's ``__dict__`` (a plain object, so not a second registration)."""

    def __init__(self, encoder: PrefixEncoder, index: int, where: str):
        self.encoder, self.index, self.where = encoder, index, where
        self.captured: Optional[list] = None


class AttentionConfigView:
    """An attention module's config: the real one, except ``_attn_implementation``."""

    __slots__ = ("_peftlab_base",)

    def __init__(self, base: Any):
        object.__setattr__(self, "_peftlab_base", base)

    @property
    def _attn_implementation(self) -> str:
        return PREFIX_IMPLEMENTATION

    @property
    def base_attn_implementation(self) -> Optional[str]:
        return self._peftlab_base._attn_implementation

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_peftlab_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._peftlab_base, name, value)

    def __deepcopy__(self, memo: dict) -> "AttentionConfigView":
        return AttentionConfigView(copy.deepcopy(self._peftlab_base, memo))

    def __copy__(self) -> "AttentionConfigView":
        return AttentionConfigView(self._peftlab_base)

    def __reduce__(self):
        return (AttentionConfigView, (self._peftlab_base,))

    def __repr__(self) -> str:
        return f"AttentionConfigView({PREFIX_IMPLEMENTATION} over {self.base_attn_implementation})"


# ------------------------------------------------------------------------------- the attention call


def _generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _inner_attention(module: nn.Module, implementation: Optional[str]) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in (None, "eager"):
        own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        return own if callable(own) else _generic_eager
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise PeftlabError(
            f"method.name: prefix tuning supports the attention implementations "
            f"{', '.join(SUPPORTED_IMPLEMENTATIONS)}, not '{implementation}'"
        )
    return ALL_ATTENTION_FUNCTIONS[implementation]


def extend_mask(
    mask: Optional[torch.Tensor], query: torch.Tensor, key: torch.Tensor, prefix_len: int, causal_if_none: bool,
    additive: bool,
) -> Optional[torch.Tensor]:
    """The attention mask with ``prefix_len`` visible columns in front (``key`` is without the prefix).

    ``mask`` None means: everything visible, or (``causal_if_none``) sdpa's ``is_causal``, a
    top-left-aligned lower triangle, which is made explicit here since the keys grow.
    """
    if mask is None:
        if not causal_if_none:
            return None
        q_len, k_len = query.shape[2], key.shape[2]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()[None, None]
        if additive:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
    if not isinstance(mask, torch.Tensor):
        raise PeftlabError(f"method.name: prefix tuning cannot extend an attention mask of type {type(mask).__name__}")
    shape = (*mask.shape[:-1], prefix_len)
    if mask.dtype == torch.bool:
        pad = torch.ones(shape, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    **kwargs: Any,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The attention function registered as ``peftlab_prefix``: prefix in, then the real one."""
    config = module.config
    implementation = config.base_attn_implementation if isinstance(config, AttentionConfigView) else None
    inner = _inner_attention(module, implementation)
    slot: Optional[_Slot] = module.__dict__.get(SLOT_ATTR)
    if slot is not None and slot.captured is not None:  # init_from_vocab's forward: keep the layer's keys/values
        slot.captured.append(torch.stack([key[0], value[0]]).detach())
    if slot is None or not slot.encoder.enabled:
        return inner(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("position_bias") is not None:
        raise PeftlabError(f"{slot.where}: prefix tuning does not support attention with a position bias")
    kv = slot.encoder.layer_kv(slot.index).to(device=key.device, dtype=key.dtype)
    if kv.shape[1] != key.shape[1] or kv.shape[-1] != key.shape[-1]:
        raise PeftlabError(
            f"{slot.where}: prefix has {kv.shape[1]} heads of size {kv.shape[-1]}, the layer's keys "
            f"{key.shape[1]} of size {key.shape[-1]}"
        )
    batch, P = key.shape[0], kv.shape[2]
    prefix_k = kv[0].unsqueeze(0).expand(batch, -1, -1, -1)
    prefix_v = kv[1].unsqueeze(0).expand(batch, -1, -1, -1)
    if implementation == "sdpa":
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        causal_if_none = query.shape[2] > 1 and bool(causal)
    else:  # eager applies exactly the mask it is given
        causal_if_none = False
    attention_mask = extend_mask(attention_mask, query, key, P, causal_if_none, additive=implementation != "sdpa")
    key = torch.cat([prefix_k, key], dim=2)
    value = torch.cat([prefix_v, value], dim=2)
    return inner(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if ALL_ATTENTION_FUNCTIONS.get(PREFIX_IMPLEMENTATION) is not prefix_attention:
        AttentionInterface.register(PREFIX_IMPLEMENTATION, prefix_attention)


# ----------------------------------------------------------------------------------- applying it


def find_attention_modules(model: nn.Module, options: PrefixOptions) -> list[tuple[str, nn.Module]]:
    layers = find_layers(model)
    layers_name = next(n for n, m in model.named_modules() if m is layers)
    names = {n for n, _ in layers[0].named_modules() if n}
    if options.attention_module is not None:
        rel = options.attention_module
        if rel not in names:
            raise PeftlabError(
                f"method.attention_module: no module '{rel}' in a transformer layer ({type(layers[0]).__name__})"
            )
    else:
        rel = next((c for c in ATTENTION_CANDIDATES if c in names), None)
        if rel is None:
            attn = sorted(n for n, m in layers[0].named_modules() if n and "attention" in type(m).__name__.lower())
            raise PeftlabError(
                f"method.attention_module: cannot detect the self-attention module of {type(layers[0]).__name__}; "
                f"set it to one of: {', '.join(attn) or '(none found)'}"
            )
    found = []
    for i, layer in enumerate(layers):
        module = layer.get_submodule(rel)
        where = f"{layers_name}.{i}.{rel}"
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            source = ""
        if "_attn_implementation" not in source or not hasattr(module, "config"):
            raise PeftlabError(
                f"method.attention_module: {where} ({type(module).__name__}) does not dispatch through "
                f"transformers' attention interface; prefix tuning cannot inject its keys there"
            )
        found.append((where, module))
    return found


def _shape_of(module: nn.Module) -> tuple[int, int]:
    """(key/value heads, head size) of an attention module."""
    config = module.config
    heads = getattr(module, "num_attention_heads", None) or getattr(config, "num_attention_heads")
    head_dim = (
        getattr(module, "head_dim", None)
        or getattr(module, "attention_head_size", None)
        or getattr(config, "head_dim", None)
        or config.hidden_size // heads
    )
    kv_heads = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None) or heads
    return int(kv_heads), int(head_dim)


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def add_prefix(model: nn.Module, options: PrefixOptions) -> PrefixEncoder:
    if hasattr(model, ENCODER_NAME):
        raise PeftlabError("method.name: the model already has a prefix")
    implementation = model.config._attn_implementation
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise PeftlabError(
            f"method.name: prefix tuning supports the attention implementations "
            f"{', '.join(SUPPORTED_IMPLEMENTATIONS)}, this model uses '{implementation}'"
        )
    _register_attention()
    modules = find_attention_modules(model, options)
    shapes = {_shape_of(m) for _, m in modules}
    if len(shapes) != 1:
        raise PeftlabError(f"method.name: prefix tuning needs attention layers of one shape, found {sorted(shapes)}")
    kv_heads, head_dim = shapes.pop()
    embed_dim = int(getattr(model.config, "hidden_size", kv_heads * head_dim))
    encoder = PrefixEncoder(len(modules), kv_heads, head_dim, options, embed_dim).to(_device_of(model))
    setattr(model, ENCODER_NAME, encoder)
    slots = []
    for index, (where, module) in enumerate(modules):
        slots.append(_Slot(encoder, index, where))
        module.__dict__[SLOT_ATTR] = slots[-1]
        module.config = AttentionConfigView(module.config)
    if options.init == "vocab" and _device_of(model).type != "meta":  # a meta model (the planner's) has no values
        init_from_vocab(model, encoder, slots)
    return encoder


def init_from_vocab(model: nn.Module, encoder: PrefixEncoder, slots: list[_Slot]) -> None:
    """Set the prefix to the keys/values the frozen model computes at each layer for ``P`` token ids
    drawn (torch's generator, so the run's seed) from its vocabulary."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (1, encoder.num_virtual_tokens)).to(_device_of(model))
    was_training, encoder.enabled = model.training, False
    for slot in slots:
        slot.captured = []
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        kv = torch.stack([slot.captured[0] for slot in slots])  # (L, 2, n_kv, P, head_dim)
    finally:
        for slot in slots:
            slot.captured = None
        encoder.enabled = True
        model.train(was_training)
    with torch.no_grad():
        encoder.prefix.copy_(kv.to(encoder.prefix.dtype))


def get_prefix_encoder(model: nn.Module) -> PrefixEncoder:
    for name in (ENCODER_NAME, f"module.{ENCODER_NAME}"):
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    raise PeftlabError("model: it has no prefix (method 'prefix' was not applied)")


@contextmanager
def prefix_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model without its prefix (exactly the bare backbone + head)."""
    encoder = get_prefix_encoder(model)
    before = encoder.enabled
    encoder.enabled = False
    try:
        yield model
    finally:
        encoder.enabled = before


@register_method
class Prefix(Method):
    name = "prefix"
    description = "prefix tuning: trainable keys/values in every attention layer (optional MLP); head trained"
    Options = PrefixOptions
    can_merge = False
    supports_quantization = True

    def _apply(self, model: Any, ctx: MethodContext, options: PrefixOptions) -> Any:
        model = prepare_quantized(model, ctx)
        for p in model.parameters():
            p.requires_grad_(False)
        add_prefix(model, options)
        self.train_head(model, ctx)
        return model

    def apply(self, model: Any, ctx: MethodContext) -> Any:
        return self._apply(model, ctx, self.options)

    def save(self, model: Any, folder: Path, ctx: MethodContext) -> None:
        """The head and the computed prefix (the reparameterisation MLP is not needed to predict)."""
        from safetensors.torch import save_file

        encoder = get_prefix_encoder(model)
        state = {
            n: p.detach().cpu().contiguous()
            for n, p in self.trainable_parameters(model).items()
            if not n.split(".", 1)[0] == ENCODER_NAME
        }
        state[f"{ENCODER_NAME}.prefix"] = encoder.export().float().cpu().contiguous()
        save_file(state, str(Path(folder) / STATE_FILE), metadata={"method": self.name, "prefix": "direct"})

    def load(self, folder: Path, ctx: MethodContext) -> Any:
        from safetensors.torch import load_file

        inference = self.options.model_copy(update={"reparameterize": False, "init_std": 0.0, "init": "random"})
        model = self._apply(ctx.load_base(), ctx, inference)
        load_trainable_state(model, load_file(str(Path(folder) / STATE_FILE)), str(folder))
        return model
