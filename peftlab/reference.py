"""The recipe reference that ``peftlab schema`` prints: every key, its type, default and meaning."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel

from .recipe import MethodSpec, Recipe
from .registry import METHODS, TASKS


def type_text(ann: Any) -> str:
    """A type as a recipe author reads it: ``str | list[str] | null``, ``'a' | 'b'``, ``int``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is type(None) or ann is None:
        return "null"
    if ann is Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin in (typing.Union, types.UnionType):
        # plain types before parameterized ones: typing caches equal unions, so the order a union was
        # first written in anywhere in the process (peft's, transformers') would otherwise show through
        parts = sorted((type_text(a) for a in args if a is not type(None)), key=lambda t: "[" in t)
        return " | ".join(dict.fromkeys(parts)) + (" | null" if type(None) in args else "")
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_text(a) for a in args)}]" if args else name
    return getattr(ann, "__name__", str(ann).replace("typing.", ""))


def _describe_model(model: type[BaseModel], indent: str = "  ") -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not MethodSpec:
            lines.append(f"{indent}{name}:")
            lines.extend(_describe_model(ann, indent + "  "))
            continue
        if field.is_required():
            default = "required"
        else:
            default = "default " + repr(field.get_default(call_default_factory=True))
        lines.append(f"{indent}{name}: {type_text(ann)}  ({default})  {field.description or ''}".rstrip())
    return lines


def describe_schema() -> str:
    """The recipe reference (every key, type, default, description), including method options."""
    out = ["# peftlab recipe reference (generated from peftlab/recipe.py)", ""]
    out.append("description: str | null  (default None)  Free text.")
    for name in ("backbone", "data", "train", "output"):
        out.append(f"{name}:")
        out.extend(_describe_model(Recipe.model_fields[name].annotation))
    out.append(f"task: one of {', '.join(TASKS.available())}  (required)")
    out.append("task_options:  The task's own keys:")
    for name, cls in TASKS.available().items():
        out.append(f"  # task = {name}: {cls.description}")
        out.extend(_describe_model(cls.Options, "    ") or ["    (none)"])
    out.append("method:")
    out.append("  name: str  (required)  One of the methods below; the other keys are its options.")
    for name, cls in METHODS.available().items():
        out.append(f"  # method.name = {name}: {cls.description}")
        out.extend(_describe_model(cls.Options, "    "))
    return "\n".join(out) + "\n"
