"""The recipe reference that ``peftlab schema`` prints: every key, its type, default and meaning."""

from __future__ import annotations

from pydantic import BaseModel

from .recipe import MethodSpec, Recipe
from .registry import METHODS, TASKS



def _describe_model(model: type[BaseModel], indent: str = "  ") -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not MethodSpec:
            lines.append(f"{indent}{name}:")
            lines.extend(_describe_model(ann, indent + "  "))
            continue
        type_txt = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        if str(ann).startswith("typing.Literal") or "Literal" in str(ann):
            type_txt = " | ".join(map(str, getattr(ann, "__args__", ())))
        if "Optional" in str(ann) or "None" in str(ann):
            args = [a for a in getattr(ann, "__args__", ()) if a is not type(None)]
            inner = args[0] if args else ann
            type_txt = (
                " | ".join(map(str, getattr(inner, "__args__", ())))
                if "Literal" in str(inner)
                else getattr(inner, "__name__", str(inner))
            ) + " | null"
        if field.is_required():
            default = "required"
        else:
            default = "default " + repr(field.get_default(call_default_factory=True))
        lines.append(f"{indent}{name}: {type_txt}  ({default})  {field.description or ''}".rstrip())
    return lines


def describe_schema() -> str:
    """The recipe reference (every key, type, default, description), including method options."""
    out = ["# peftlab recipe reference (generated from peftlab/recipe.py)", ""]
    out.append("description: str | null  (default None)  Free text.")
    for name in ("backbone", "data", "train", "output"):
        out.append(f"{name}:")
        out.extend(_describe_model(Recipe.model_fields[name].annotation))
    out.append(f"task: one of {', '.join(TASKS.available())}  (required)")
    out.append("method:")
    out.append("  name: str  (required)  One of the methods below; the other keys are its options.")
    for name, cls in METHODS.available().items():
        out.append(f"  # method.name = {name}: {cls.description}")
        out.extend(_describe_model(cls.Options, "    "))
    return "\n".join(out) + "\n"
