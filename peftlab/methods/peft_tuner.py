"""peft passthrough: every other peft tuner that fits encoder/decoder fine-tuning, by its peft name.

``method: {name: ia3}``, ``method: {name: loha, r: 16, alpha: 16}``, ``method: {name: vera, r: 128}``:
the keys after ``name`` are the fields of peft's own config class (``IA3Config``, ``LoHaConfig``,
...), with peft's defaults. They are validated when the recipe is loaded (``peftlab validate``):
the field names and types come from the config dataclass, then peft's config class is built once so
that its own checks run. Unknown keys and wrong values raise one line naming ``method.<key>`` and the
closest valid key. peftlab sets ``task_type`` and puts the task head into ``modules_to_save`` (the
head trains and is saved with the adapter, like ``lora``); a ``modules_to_save`` option adds more.

Every tuner listed in :data:`TUNERS` was checked on BERT token and sequence classification with
peft 0.21.2 / transformers 5.24: trains, saves and reloads to identical predictions, and (where
``can_merge``) ``merge_and_unload`` reproduces the adapted model. ``quantization`` marks the tuners
whose adapted model matches the full-precision one within quantization error on int8 and nf4
backbones; the others are refused on quantized backbones at recipe load (several run but compute
with the raw int8/4-bit storage, which is silently wrong).

Not registered, and why (see :data:`UNAVAILABLE`):

* ``lora`` / DoRA / rsLoRA: peftlab's own ``lora`` method (``use_dora: true``, ``use_rslora: true``).
* prompt learning (``prompt_tuning``, ``p_tuning``, ``multitask_prompt_tuning``, ``cpt``,
  ``cartridge``, ``adaption_prompt``): they prepend virtual tokens to the input, so a token
  classifier returns ``num_virtual_tokens`` more logits than there are labels (peft: "Expected input
  batch_size (9) to match target batch_size (5)"); CPT and adaption prompts are causal-LM/Llama only.
  peftlab's ``prefix`` method is prefix tuning that works on BERT and Llama.
* ``adalora``: needs the training loop to call ``update_and_allocate`` every step (and ``total_step``).
* ``poly``, ``xlora``: multi-task / mixture-of-LoRA-experts routing (task ids, pre-trained adapters).
* ``trainable_tokens``: trains embedding rows of given token ids; no ``modules_to_save``, so the task
  head could not train.
* ``shadow``: crashes in its forward pass on BERT ("'ShadowCarrier' object has no attribute 'view'").
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from ..errors import PeftlabError
from ..registry import TASKS
from ..validation import yaml_line
from . import (Method, MethodContext, check_modules_to_save, merge_peft_model, pass_all_inputs, prepare_quantized,
               register_method, register_unavailable)


@dataclass(frozen=True)
class Tuner:
    peft_type: str  # peft.PeftType value
    description: str
    can_merge: bool = True
    quantization: bool = False  # verified on int8 and nf4 backbones


TUNERS: dict[str, Tuner] = {
    "ia3": Tuner("IA3", "(IA)^3: learned rescaling of keys, values and feed-forward activations", quantization=True),
    "loha": Tuner("LOHA", "LoHa: low-rank Hadamard-product weight update (LyCORIS)"),
    "lokr": Tuner("LOKR", "LoKr: Kronecker-product weight update (LyCORIS)"),
    "vera": Tuner("VERA", "VeRA: frozen shared random low-rank matrices, trained scaling vectors", quantization=True),
    "pvera": Tuner("PVERA", "PVeRA: probabilistic VeRA (shared random matrices, trained scales)", quantization=True),
    "oft": Tuner("OFT", "OFT: orthogonal fine-tuning (block-diagonal rotations)", quantization=True),
    "boft": Tuner("BOFT", "BOFT: butterfly-factorised orthogonal fine-tuning", quantization=True),
    "hra": Tuner("HRA", "HRA: Householder-reflection adaptation"),
    "fourierft": Tuner("FOURIERFT", "FourierFT: trained sparse spectral coefficients of the weight update"),
    "waveft": Tuner("WAVEFT", "WaveFT: trained sparse wavelet coefficients of the weight update"),
    "vblora": Tuner(
        "VBLORA", "VB-LoRA: low-rank factors mixed from a shared vector bank (vector_length | layer sizes)",
        quantization=True,
    ),
    "randlora": Tuner("RANDLORA", "RandLoRA: full-rank update from shared random bases"),
    "road": Tuner("ROAD", "RoAd: 2D rotary adaptation (group_size | out_features)", quantization=True),
    "shira": Tuner("SHIRA", "SHiRA: sparse high-rank adapter", quantization=True),
    "c3a": Tuner("C3A", "C3A: circular-convolution adapter (block_size | layer sizes)"),
    "miss": Tuner("MISS", "MiSS (formerly Bone): shard-shared weight update", quantization=True),
    "hira": Tuner("HIRA", "HiRA: Hadamard high-rank adaptation", quantization=True),
    "delora": Tuner("DELORA", "DeLoRA: decoupled (norm-bounded) low-rank adaptation"),
    "gralora": Tuner("GRALORA", "GraLoRA: granular (block-wise) low-rank adaptation"),
    "glora": Tuner("GLORA", "GLoRA: generalised LoRA (weight, bias and prompt terms)"),
    "lily": Tuner("LILY", "Lily: low-rank adapters interconnected across layers", can_merge=False),
    "osf": Tuner("OSF", "OSF: orthogonal subspace fine-tuning"),
    "psoft": Tuner("PSOFT", "PSOFT: orthogonal transform inside a principal low-rank subspace"),
    "adamss": Tuner("ADAMSS", "AdaMSS: adaptive multi-subspace (SVD-clustered) fine-tuning"),
    "deft": Tuner("DEFT", "DEFT: decompositional (residual-projection) fine-tuning"),
    "frod": Tuner("FROD", "FRoD: random-projection fine-tuning"),
    "beft": Tuner("BEFT", "BEFT: trained bias terms of the value projections", quantization=True),
    "peanut": Tuner("PEANUT", "PEANuT: weight-aware neural tweakers"),
    "supertuning": Tuner("SUPERTUNING", "Super-Tuning: trained sparse support of weight entries"),
    "tinylora": Tuner("TINYLORA", "TinyLoRA: tiny trained vector through fixed SVD/random projections"),
    "unilora": Tuner("UNILORA", "UniLoRA: LoRA parameters drawn from one shared trainable vector"),
    "ln_tuning": Tuner(
        "LN_TUNING", "LN tuning: train the normalisation layers (set target_modules, e.g. [LayerNorm])",
        quantization=True,
    ),
}

UNAVAILABLE: dict[str, str] = {
    **{
        n: "peft's prompt learning prepends virtual tokens, which breaks token classification "
        "(more logits than labels); use method 'prefix' (prefix tuning on BERT and Llama) or 'lora'"
        for n in ("prompt_tuning", "p_tuning", "multitask_prompt_tuning", "cartridge")
    },
    "prefix_tuning": "peft's prefix tuning does not run on transformers 5.24 (BERT renamed past_key_values); "
    "use method 'prefix'",
    "cpt": "CPT is context-aware prompt tuning for causal LMs only; use 'prefix' or 'lora'",
    "adaption_prompt": "adaption prompts are Llama-only prompt learning; use 'prefix' or 'lora'",
    "adalora": "AdaLoRA needs update_and_allocate() in the training loop; use 'lora'",
    "poly": "Poly routes between adapters by task id (multi-task training); use 'lora'",
    "xlora": "X-LoRA mixes pre-trained LoRA adapters; use 'lora'",
    "trainable_tokens": "trainable_tokens cannot train the task head (no modules_to_save)",
    "shadow": "peft's ShadowPEFT crashes on BERT in peft 0.21.2",
    "dora": "DoRA is `method: {name: lora, use_dora: true}`",
}

# Config fields peftlab sets itself (or that only matter to peft's hub/inference machinery).
RESERVED_FIELDS = {
    "name", "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode",
}


def _peft_config_class(tuner: Tuner) -> type:
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        from peft.utils.peft_types import PeftType
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise PeftlabError(f"method: peft tuners need the peft package ({exc})") from None
    try:
        return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(tuner.peft_type)]
    except (KeyError, ValueError):
        import peft

        raise PeftlabError(
            f"method.name: peft {peft.__version__} has no {tuner.peft_type} tuner (peftlab was tested with peft 0.21.2)"
        ) from None


def _first_sentence(text: str) -> str:
    """The first sentence of peft's help text, repaired where peft runs sentences together
    ("with BEFT.For example", "efficiencyWhether") and with its brackets closed."""
    text = " ".join(str(text).split()).lstrip("(\"' ")
    text = re.sub(r"([.!?])([A-Z])", r"\1 \2", text)
    text = re.sub(r"\b([a-z]{3,})([A-Z][a-z]{2,})", r"\1. \2", text)
    m = re.match(r"(.+?(?<!e\.g)(?<!i\.e)[.!?])(\s|$)", text)
    text = m.group(1) if m else text.removesuffix("\")")
    if len(text) > 160:  # cut: close what the cut left open
        text = text[:157].rstrip() + "..."
        for opening, closing in ("()", "[]"):
            text += closing * max(0, text.count(opening) - text.count(closing))
    return text


def _usable_annotation(ann: Any) -> Any:
    try:
        TypeAdapter(ann)
        return ann
    except Exception:  # noqa: BLE001 - exotic annotations (torch types, forward refs) accept anything
        return Any


def _with_default_type(ann: Any, default: Any) -> Any:
    """peft annotates some fields narrower than their defaults (``init_weights: bool`` defaulting to
    'xavier_uniform'); such a field accepts the default's type too."""
    if default is dataclasses.MISSING or default is None or ann is Any:
        return ann
    try:
        TypeAdapter(ann).validate_python(default, strict=True)
        return ann
    except Exception:  # noqa: BLE001 - pydantic's ValidationError, or an annotation it cannot check strictly
        return typing.Union[ann, type(default)]


def build_options_model(name: str, config_cls: type) -> type[BaseModel]:
    """A pydantic model whose fields are ``config_cls``'s dataclass fields (peft's defaults)."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # noqa: BLE001
        hints = {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in RESERVED_FIELDS or not f.init or f.name.startswith("_"):
            continue
        ann = _with_default_type(_usable_annotation(hints.get(f.name, Any)), f.default)
        desc = _first_sentence(f.metadata.get("help", "")) or None
        if f.default is not dataclasses.MISSING:
            fields[f.name] = (ann, Field(f.default, description=desc))
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (ann, Field(default_factory=f.default_factory, description=desc))
        else:
            fields[f.name] = (ann, Field(description=desc))
    model_name = f"{config_cls.__name__}Options"
    return create_model(  # type: ignore[call-overload]
        model_name,
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        __doc__=f"Options of method '{name}': the fields of peft's {config_cls.__name__}.",
        **fields,
    )


class _LazyOptions(type):
    """``cls.Options`` is built from peft's config class on first use (importing peft is slow)."""

    @property
    def Options(cls) -> type[BaseModel]:  # noqa: N802 - the Method API's attribute name
        if cls.__dict__.get("_options") is None:
            cls._options = build_options_model(cls.name, cls.config_class())
        return cls._options


def _mentioned_keys(message: str, keys: list[str]) -> list[str]:
    """The option names ``message`` mentions, in the order it mentions them."""
    found = {}
    for k in keys:
        m = re.search(rf"(?<![\w]){re.escape(k)}(?![\w])", message)
        if m:
            found[k] = m.start()
    return sorted(found, key=found.get)


class PeftTuner(Method, metaclass=_LazyOptions):
    """A peft tuner applied with ``get_peft_model``; saved and loaded in peft's format."""

    tuner: ClassVar[Tuner]
    _options: ClassVar[Optional[type[BaseModel]]] = None

    def __init__(self, options: Optional[BaseModel] = None):
        super().__init__(options if options is not None else type(self).Options())

    @classmethod
    def config_class(cls) -> type:
        return _peft_config_class(cls.tuner)

    # -- recipe-level checks ----------------------------------------------------------------------
    @classmethod
    def check_recipe(cls, recipe: Any, options: BaseModel) -> None:
        super().check_recipe(recipe, options)
        try:
            cls.make_config(options, task_name=recipe.task, head_names=[])
        except Exception as exc:  # noqa: BLE001 - peft raises ValueError, TypeError, ...
            raise PeftlabError(cls._explain(exc, options, where=_where(recipe))) from None

    @classmethod
    def make_config(cls, options: BaseModel, task_name: str, head_names: list[str]) -> Any:
        kwargs = options.model_dump()
        extra = kwargs.pop("modules_to_save", None) or []
        if isinstance(extra, str):
            extra = [extra]
        save = list(dict.fromkeys([*head_names, *extra]))
        config_cls = cls.config_class()
        if "modules_to_save" in {f.name for f in dataclasses.fields(config_cls)}:
            kwargs["modules_to_save"] = save or None
        return config_cls(task_type=TASKS.get(task_name).peft_task_type, **kwargs)

    @classmethod
    def _explain(cls, exc: Exception, options: BaseModel, where: str = "", model_type: str = "") -> str:
        """One line: ``where: method.<key>: what peft said``."""
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        keys = list(type(options).model_fields)
        mentioned = _mentioned_keys(msg, keys)
        set_by_user = [k for k in mentioned if k in options.model_fields_set]
        key = (set_by_user or mentioned or [None])[0]
        prefix = f"{where}: " if where else ""
        config_name = cls.config_class().__name__
        target = getattr(options, "target_modules", "unset")
        if target is None and "target_modules" in msg:
            kind = f" for model type '{model_type}'" if model_type else ""
            return (
                f"{prefix}method.target_modules: peft's {config_name} has no default target modules{kind}; "
                f"set method.target_modules (module-name suffixes such as [query, value], or all-linear)"
            )
        on = f" on this {model_type} model" if model_type else ""
        return f"{prefix}method.{key or 'name'}: peft's {config_name} rejects it{on}: {msg}"

    # -- training ---------------------------------------------------------------------------------
    def peft_config(self, ctx: MethodContext) -> Any:
        return self.make_config(self.options, ctx.task.name, list(ctx.head_names))

    def apply(self, model: Any, ctx: MethodContext) -> Any:
        from peft import get_peft_model

        config = self.peft_config(ctx)
        check_modules_to_save(model, getattr(self.options, "modules_to_save", None))
        model = prepare_quantized(model, ctx)
        try:
            return pass_all_inputs(get_peft_model(model, config))
        except (ValueError, TypeError, KeyError, RuntimeError, AssertionError, NotImplementedError) as exc:
            model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
            raise PeftlabError(self._explain(exc, self.options, model_type=model_type)) from None

    # -- persistence ------------------------------------------------------------------------------
    def save(self, model: Any, folder: Path, ctx: MethodContext) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)

    def load(self, folder: Path, ctx: MethodContext) -> Any:
        from peft import PeftModel

        return pass_all_inputs(PeftModel.from_pretrained(ctx.load_base(), str(folder), is_trainable=False))

    def merge(self, model: Any) -> Any:
        if not self.can_merge:
            return super().merge(model)
        return merge_peft_model(model)


def _where(recipe: Any) -> str:
    """``file:line`` of the method section when the recipe came from a file."""
    source = getattr(recipe, "source", "<recipe>")
    try:
        text = Path(source).read_text(encoding="utf-8") if Path(source).is_file() else None
    except (OSError, ValueError):
        text = None
    line = yaml_line(text, ("method",)) if text else None
    return f"{source}:{line}" if line else source


def _make_method(name: str, tuner: Tuner) -> type[PeftTuner]:
    cls = _LazyOptions(
        f"Peft_{name}",
        (PeftTuner,),
        {
            "__module__": __name__,
            "__qualname__": f"Peft_{name}",
            "__doc__": f"peft's {tuner.peft_type} tuner: {tuner.description}.",
            "name": name,
            "description": f"{tuner.description} (peft)",
            "tuner": tuner,
            "can_merge": tuner.can_merge,
            "supports_quantization": tuner.quantization,
        },
    )
    return register_method(cls)


for _name, _tuner in TUNERS.items():
    _make_method(_name, _tuner)
for _name, _reason in UNAVAILABLE.items():
    register_unavailable(_name, _reason)
