"""Method plugins and their registry.

A method is one module with one class implementing :class:`Method`:

* ``Options``: a pydantic model of its recipe keys (``method: {name: lora, r: 8}``);
* ``apply(model, ctx)``: make the model trainable its way, return the model to train;
* ``trainable_parameters(model)``: what the optimizer updates (default: ``requires_grad``);
* ``save(model, folder, ctx)`` / ``load(folder, ctx)``: safetensors in, safetensors out, head included;
* ``can_merge`` and ``merge(model)``: fold the method into plain ``transformers`` weights;
* ``supports_quantization``: whether it trains on an int8/nf4/fp4 backbone.

Register a built-in in one line with ``@register_method`` (and its module's name in
``peftlab.registry.METHODS``). Third-party packages register through the entry-point group
``peftlab.methods`` (``name = "pkg.module:MyMethod"``). A method never edits the trainer.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import PeftlabError
from ..registry import METHODS

METHOD_FILE = "peftlab_method.json"
STATE_FILE = "peftlab_weights.safetensors"

class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class MethodContext:
    """What a method may need to know about the model it wraps."""

    task: Any  # peftlab.tasks.Task
    backbone: Any  # peftlab.recipe.BackboneConfig
    head_names: list[str] = field(default_factory=list)
    load_base: Optional[Callable[[], Any]] = None  # builds a fresh backbone+head model

    @property
    def quantized(self) -> bool:
        return self.backbone.quantization != "none"


class Method:
    """Base class of method plugins; the defaults suit methods that add or unfreeze modules."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    can_merge: ClassVar[bool] = False
    supports_quantization: ClassVar[bool] = False

    def __init__(self, options: Optional[BaseModel] = None):
        self.options = options if options is not None else self.Options()

    # -- recipe-level checks ----------------------------------------------------------------------
    @classmethod
    def check_recipe(cls, recipe: Any, options: BaseModel) -> None:
        """Raise PeftlabError for combinations this method cannot run (called at recipe load)."""
        if recipe.backbone.quantization != "none" and not cls.supports_quantization:
            able = [n for n, m in available_methods().items() if m.supports_quantization]
            raise PeftlabError(
                f"{recipe.source}: method.name: method '{cls.name}' cannot train a quantized backbone "
                f"(backbone.quantization: {recipe.backbone.quantization}); methods that can: {', '.join(able)} "
                f"(or set backbone.quantization: none)"
            )

    # -- training ---------------------------------------------------------------------------------
    def apply(self, model: Any, ctx: MethodContext) -> Any:
        raise NotImplementedError

    @staticmethod
    def train_head(model: Any, ctx: MethodContext) -> None:
        """Make the task head (``ctx.head_names``) trainable."""
        for name in ctx.head_names:
            for p in getattr(model, name).parameters():
                p.requires_grad_(True)

    def trainable_parameters(self, model: Any) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    # -- persistence ------------------------------------------------------------------------------
    def save(self, model: Any, folder: Path, ctx: MethodContext) -> None:
        """Default: the trainable tensors as safetensors (loaded back over a freshly built model)."""
        from safetensors.torch import save_file

        state = {n: p.detach().cpu().contiguous() for n, p in self.trainable_parameters(model).items()}
        save_file(state, str(Path(folder) / STATE_FILE), metadata={"method": self.name})

    def load(self, folder: Path, ctx: MethodContext) -> Any:
        from safetensors.torch import load_file

        model = self.apply(ctx.load_base(), ctx)
        load_trainable_state(model, load_file(str(Path(folder) / STATE_FILE)), str(folder))
        return model

    # -- merging ----------------------------------------------------------------------------------
    def merge(self, model: Any) -> Any:
        mergeable = [n for n, m in available_methods().items() if m.can_merge]
        raise PeftlabError(
            f"method '{self.name}' cannot be merged into the backbone's weights "
            f"(methods that can: {', '.join(mergeable)}); use `peftlab export` instead"
        )


def prepare_quantized(model: Any, ctx: MethodContext) -> Any:
    """peft's k-bit preparation (fp32 norms, input gradients) when the backbone is quantized; a no-op
    otherwise. Methods that train added parameters on int8/nf4/fp4 backbones call it first."""
    if ctx.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def check_modules_to_save(model: Any, names: Any) -> list[Any]:
    """peft silently ignores a ``modules_to_save`` entry that matches no module (a typo would train
    nothing extra): every entry must name a module, by full name or dotted suffix, as peft matches.
    A module quantized at load (int8/nf4 weights) cannot train in full either. Returns the matched
    modules."""
    from ..backbones import match_modules

    if not names:
        return []
    modules = {n: m for n, m in model.named_modules() if n}
    found = []
    for target in [names] if isinstance(names, str) else names:
        kind = getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__
        matched = match_modules(list(modules), target, "method.modules_to_save", kind)
        for name in matched:
            for pname, p in modules[name].named_parameters():
                if not p.is_floating_point():
                    raise PeftlabError(
                        f"method.modules_to_save: {name}.{pname} is quantized ({p.dtype}) and cannot train in "
                        f"full; keep it in full precision with backbone.unquantized_modules: [{target}], or leave it out"
                    )
            found.append(modules[name])
    return found


def pass_all_inputs(model: Any) -> Any:
    """peft's ``PeftModelForQuestionAnswering.forward`` (0.21) drops ``token_type_ids`` and
    ``position_ids``: a BERT trained through it never sees which tokens are the context, and its merged
    checkpoint (which does) answers differently. The base ``PeftModel.forward`` passes every input on."""
    from peft import PeftModel, PeftModelForQuestionAnswering

    if isinstance(model, PeftModelForQuestionAnswering) and not model.active_peft_config.is_prompt_learning:
        model.forward = types.MethodType(PeftModel.forward, model)
    return model


def merge_peft_model(model: Any) -> Any:
    """``merge_and_unload`` of a peft model. When the output layer (e.g. ``lm_head``) shares its weight
    with the input embeddings and an adapter sits on either of them, merging would fold that update
    into both, unlike the trained model (which adapts one path only): the output layer gets its own
    copy first, and the config records that the merged checkpoint's weights are no longer tied."""
    base = model.get_base_model()
    out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    # an adapter-wrapped layer keeps the original as base_layer
    out_layer, emb_layer = getattr(out, "base_layer", out), getattr(emb, "base_layer", emb)
    adapted = out_layer is not out or emb_layer is not emb
    if adapted and out_layer is not None and emb_layer is not None and out_layer.weight is emb_layer.weight:
        out_layer.weight = torch.nn.Parameter(out_layer.weight.detach().clone(), requires_grad=False)
        for cfg in (base.config, getattr(base.config, "get_text_config", lambda: None)()):
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
    return model.merge_and_unload()


def load_trainable_state(model: Any, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into ``model``'s parameters by name; every key must match a parameter. Whole
    tensors go into FSDP-sharded parameters as this process's part."""
    from ..sharded import shard_like

    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise PeftlabError(f"{where}: weights do not fit the model (e.g. unknown tensor '{missing[0]}')")
    with torch.no_grad():
        for k, v in state.items():
            if params[k].shape != v.shape:
                raise PeftlabError(
                    f"{where}: tensor '{k}' has shape {tuple(v.shape)}, the model expects {tuple(params[k].shape)}"
                )
            params[k].copy_(shard_like(v, params[k]))  # copy_ converts device and dtype


def _check_plugin_class(cls: Any, ep_name: str) -> Optional[str]:
    """Why a Method subclass from an entry point is not usable, or None."""
    if cls.apply is Method.apply:
        return f"{cls.__name__} does not implement apply(model, ctx)"
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, BaseModel)):
        return f"{cls.__name__}.Options is not a pydantic BaseModel"
    return None


METHODS.configure(Method, _check_plugin_class)
register_method = METHODS.register
register_unavailable = METHODS.register_unavailable
available_methods = METHODS.available
get_method_class = METHODS.get
plugin_problems = METHODS.problems


def build_method(recipe: Any) -> Method:
    cls = get_method_class(recipe.method.name)
    options = recipe.method_options
    if options is None:
        options = cls.Options.model_validate(recipe.method.options_dict())
    return cls(options)


def write_method_file(folder: Path, method: Method, recipe: Any, labels: list[str], head_names: list[str]) -> None:
    info = {
        "method": method.name,
        "head_names": list(head_names),
        "options": method.options.model_dump(mode="json"),
        "backbone": recipe.backbone.model_dump(mode="json"),
        "task": recipe.task,
        "labels": labels,
    }
    (Path(folder) / METHOD_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read_method_file(folder: Path) -> dict:
    path = Path(folder) / METHOD_FILE
    if not path.is_file():
        raise PeftlabError(f"{folder}: not a peftlab model folder (no {METHOD_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def describe_methods() -> list[dict]:
    rows = []
    for name, cls in available_methods().items():
        rows.append(
            {
                "name": name,
                "merges": cls.can_merge,
                "quantization": cls.supports_quantization,
                "description": cls.description,
                "source": METHODS.source(name) + f" ({cls.__module__})",
            }
        )
    return rows
