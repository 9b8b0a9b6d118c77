"""``lora``: low-rank adapters through peft; the task head trains and is saved with the adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from . import (Method, MethodContext, check_modules_to_save, merge_peft_model, pass_all_inputs, prepare_quantized,
               register_method)

class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, description="Scaling numerator (update scaled by alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[str, list[str]] = Field(
        "all-linear", description="Module names (or suffixes) to adapt; 'all-linear' = every linear layer but the head."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA.")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r).")
    modules_to_save: list[str] = Field(
        [], description="More modules trained in full and saved with the adapter (the task head always is), e.g. [pooler]."
    )
    fast_path: bool = Field(
        True,
        description="Run LoRA layers on linear bases through peftlab's own forward/backward (methods/lora_fast.py): "
        "the same function and weights as peft's, dropout drawn once per shared input, less saved for backward. "
        "false = peft's own forward.",
    )
    recompute_inputs: bool = Field(
        True,
        description="With fast_path: where an adapted layer's input is a GELU's, a LayerNorm's or a product's output, "
        "backward computes it again from what autograd keeps anyway instead of keeping a copy (methods/lora_inputs.py): "
        "the same bits, less memory, one more such pass per layer in backward. false = keep the copy.",
    )


@register_method
class Lora(Method):
    name = "lora"
    description = "LoRA low-rank adapters (peft); task head trained and saved with the adapter"
    Options = LoraOptions
    can_merge = True
    supports_quantization = True

    def peft_config(self, ctx: MethodContext) -> Any:
        from peft import LoraConfig

        o = self.options
        return LoraConfig(
            r=o.r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=o.target_modules,
            bias=o.bias,
            use_dora=o.use_dora,
            use_rslora=o.use_rslora,
            modules_to_save=list(dict.fromkeys([*ctx.head_names, *o.modules_to_save])) or None,
            task_type=ctx.task.peft_task_type,
        )

    def apply(self, model: Any, ctx: MethodContext) -> Any:
        from peft import get_peft_model

        check_modules_to_save(model, self.options.modules_to_save)
        model = prepare_quantized(model, ctx)
        return self._install_fast_path(pass_all_inputs(get_peft_model(model, self.peft_config(ctx))))

    def _install_fast_path(self, model: Any) -> Any:
        if self.options.fast_path:
            from .lora_fast import install

            install(model, recompute=self.options.recompute_inputs)
        return model

    def save(self, model: Any, folder: Path, ctx: MethodContext) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)

    def load(self, folder: Path, ctx: MethodContext) -> Any:
        from peft import PeftModel

        model = PeftModel.from_pretrained(ctx.load_base(), str(folder), is_trainable=False)
        return self._install_fast_path(pass_all_inputs(model))

    def merge(self, model: Any) -> Any:
        return merge_peft_model(model)


def headless_lora_config(config: Any) -> Any:
    """A copy of a run's LoRA config for a base without its task head (combining adapters, mixed
    batches): no task type and no modules_to_save (peft would wrap the head per adapter and refuse to
    share it), the head's names out of target_modules (a head listed there was trained whole, not
    adapted), and the default initialisation (the weights are replaced; PiSSA-style initialisations
    would change the shared base)."""
    import copy

    config = copy.deepcopy(config)
    heads = set(config.modules_to_save or ())
    if isinstance(config.target_modules, (list, set)):
        config.target_modules = {t for t in config.target_modules if t not in heads}
    config.modules_to_save, config.task_type, config.inference_mode = None, None, True
    config.init_lora_weights = True
    return config
