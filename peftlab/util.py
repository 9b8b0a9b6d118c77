"""Small helpers every layer uses: the process's device, JSON files, bitsandbytes checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from .errors import PeftlabError

PathLike = Union[str, Path]
BNB_PARAMETER_TYPES = ("Params4bit", "Int8Params")


def default_device() -> Any:
    """The device accelerate gives this process (cuda:<local rank>, mps, xpu or cpu)."""
    from accelerate import PartialState

    return PartialState().device


def read_json(path: PathLike) -> Any:
    """A JSON file's content; raises OSError / ValueError as json and open do."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_utf8(path: Path, must_be: str) -> str:
    """A user's text file without its byte-order mark. Bytes that are not UTF-8 get one line naming
    the file, the line and the byte, then ``must_be`` (e.g. "data files must be UTF-8")."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PeftlabError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); {must_be}") from None
    return text.lstrip("\ufeff")


def read_json_or_none(path: PathLike) -> Optional[Any]:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def is_bnb_model(model: Any) -> bool:
    """True when some parameter is a bitsandbytes int8/4-bit tensor."""
    return any(type(p).__name__ in BNB_PARAMETER_TYPES for p in model.parameters())


def scalar_items(d: Any, drop: tuple = ()) -> Optional[dict]:
    """The int/float (not bool) entries of a dict, without the keys in ``drop``; None for a non-dict."""
    if not isinstance(d, dict):
        return None
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in drop}
