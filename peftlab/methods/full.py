"""``full``: every parameter trains; saved as a plain transformers checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backbones import load_task_model
from . import Method, MethodContext, register_method


@register_method
class FullFineTune(Method):
    name = "full"
    description = "full fine-tuning: every backbone and head parameter trains"
    can_merge = True

    def apply(self, model: Any, ctx: MethodContext) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model: Any, folder: Path, ctx: MethodContext) -> None:
        model.save_pretrained(str(folder))

    def load(self, folder: Path, ctx: MethodContext) -> Any:
        return load_task_model(ctx.backbone, ctx.task, ctx.task.model_kwargs(), path=str(folder))

    def merge(self, model: Any) -> Any:
        return model
