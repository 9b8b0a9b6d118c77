"""``head``: frozen backbone + a new task head; optionally the last k layers train too."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..backbones import find_layers
from . import Method, MethodContext, register_method


POST_LAYER_MODULES = ("pooler", "norm", "final_layer_norm", "ln_f")


class HeadOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unfreeze_last_layers: int = Field(
        0, ge=0, description="Also train the last k transformer layers (and what follows them)."
    )


@register_method
class HeadOnly(Method):
    name = "head"
    description = "frozen backbone + trained task head (option: unfreeze the last k layers)"
    Options = HeadOptions
    can_merge = True

    def apply(self, model: Any, ctx: MethodContext) -> Any:
        for p in model.parameters():
            p.requires_grad_(False)
        self.train_head(model, ctx)
        k = self.options.unfreeze_last_layers
        if k:
            layers = find_layers(model)
            k = min(k, len(layers))
            for layer in layers[len(layers) - k :]:
                for p in layer.parameters():
                    p.requires_grad_(True)
            # modules that come after the layers: BERT's pooler, a decoder's final norm
            prefix = next(n for n, m in model.named_modules() if m is layers) + "."
            for name, module in model.named_modules():
                if (
                    name.rsplit(".", 1)[-1] in POST_LAYER_MODULES
                    and not name.startswith(prefix)
                    and "embed" not in name
                ):
                    for p in module.parameters():
                        p.requires_grad_(True)
        return model

    def merge(self, model: Any) -> Any:
        return model
