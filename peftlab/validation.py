"""One-line messages for schema errors: which file and line, which key, what was expected.

Every pydantic schema of peftlab (recipes, bench specs) reports its first error through
:func:`format_validation_error`.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError


def closest(word: str, choices: list[str], aliases: Optional[dict] = None) -> Optional[str]:
    """The choice that ``word`` most likely misspells (or names, by ``aliases``), or None."""
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if found:
        return found[0]
    alias = (aliases or {}).get(word)
    return alias if alias in choices else None


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside ``Optional[M]`` / ``list[M]`` / ``M``, else the annotation itself."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


def fields_at(model: type[BaseModel], path: tuple) -> Optional[list[str]]:
    """The valid key names at ``path`` inside ``model`` (list indexes skipped; None when unknown)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def yaml_line(text: Optional[str], path: tuple) -> Optional[int]:
    """1-based line of the node at ``path`` (mapping keys and sequence indexes) in YAML ``text``."""
    if not text:
        return None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def format_validation_error(err: ValidationError, source: Any, model: type[BaseModel], prefix: tuple = (),
                            text: Optional[str] = None, aliases: Optional[dict] = None) -> str:
    """One line for the first error of ``err``: ``source:line: key: what was wrong``."""
    e = err.errors()[0]
    loc = prefix + tuple(e["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = yaml_line(text, loc)
    where = f"{source}:{line}" if line else str(source)
    if e["type"] == "extra_forbidden":
        valid = fields_at(model, tuple(e["loc"][:-1])) or []
        hint = closest(str(e["loc"][-1]), valid, aliases)
        suggestion = f" (did you mean '{'.'.join(map(str, loc[:-1] + (hint,)))}'?)" if hint else ""
        return f"{where}: {key}: unknown key{suggestion}; valid keys here: {', '.join(valid)}"
    if e["type"] == "missing":
        return f"{where}: {key}: required key is missing"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    got_txt = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{where}: {key}: {msg}{got_txt}"
