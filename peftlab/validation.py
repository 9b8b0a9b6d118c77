"""One-line messages for schema errors: which file and line, which key, what was expected.

Every pydantic schema of peftlab (recipes, bench specs) reports its first error through
:func:`format_validation_error`.
"""

from __future__ import annotations

import difflib
import math
import typing
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from .errors import PeftlabError
from .util import read_utf8


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping holding the same key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(str(key), seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml_file(path: Path, what: str) -> tuple[Any, str]:
    """The parsed YAML of ``path`` and its text; one-line errors for a missing or unreadable file,
    invalid YAML and duplicate keys. ``what`` names the file's role ("recipe", "benchmark spec")."""
    if path.is_dir():
        raise PeftlabError(f"{path}: is a folder; expected a {what} file (.yaml)")
    if not path.is_file():
        raise PeftlabError(f"{path}: {what} file not found")
    try:
        text = read_utf8(path, f"a {what} must be UTF-8 YAML")
    except OSError as exc:
        raise PeftlabError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        loader = _UniqueKeyLoader(text)  # what yaml.load does, with the SafeLoader subclass above
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except _DuplicateKey as exc:
        raise PeftlabError(f"{path}:{exc.again}: duplicate key '{exc.key}' (first at line {exc.first}); "
                           "YAML would keep only the last") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PeftlabError(f"{path}{line}: invalid YAML: {problem}") from None
    return data, text


def first_non_finite(data: Any, path: tuple = ()) -> Optional[tuple[tuple, float]]:
    """The key path and value of the first inf/nan float in nested dicts/lists, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return path, data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = first_non_finite(value, path + (key,))
        if found:
            return found
    return None


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


def where_from(loc: tuple, source: Any, text: Optional[str], overrides: Optional[dict] = None) -> str:
    """``file:line`` of the key at ``loc``, or the command-line override that set it."""
    for path, item in (overrides or {}).items():
        if loc[:len(path)] == path:
            return f"command line: override '{item}'"
    line = yaml_line(text, loc)
    return f"{source}:{line}" if line else str(source)


def format_validation_error(err: ValidationError, source: Any, model: type[BaseModel], prefix: tuple = (),
                            text: Optional[str] = None, aliases: Optional[dict] = None,
                            overrides: Optional[dict] = None) -> str:
    """One line for the first error of ``err``: ``source:line: key: what was wrong``; ``overrides``
    maps key paths set on the command line to the override, which is named instead of a line."""
    e = err.errors()[0]
    loc = prefix + tuple(e["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    where = where_from(loc, source, text, overrides)
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
