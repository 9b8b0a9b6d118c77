"""Name -> class registries of the plugins a recipe names: methods and tasks.

A registry knows its built-in modules by name and its entry-point group, and imports them on the
first lookup, so modules below the plugins (the recipe schema) can look a name up without importing
the plugin packages at import time. Built-ins register first: a plugin cannot replace ``lora``.
Third-party packages register through entry points (``[project.entry-points."peftlab.methods"]``,
``"peftlab.tasks"``); a broken plugin is reported by :meth:`Registry.problems` and never breaks
the others.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from typing import Any, Callable, Optional

from .errors import PeftlabError


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class Registry:
    def __init__(self, kind: str, package: str, builtins: tuple[str, ...], optional: tuple[str, ...] = ()):
        self.kind = kind  # "method" / "task": the recipe key's name, used in messages
        self.package = package  # its import triggers configure() (the base class and the plugin check)
        self.group = package  # entry-point group: peftlab.methods / peftlab.tasks
        self.builtins, self.optional = builtins, optional
        self.base: Optional[type] = None
        self.check: Callable[[Any, str], Optional[str]] = lambda cls, name: None
        self._classes: dict[str, type] = {}
        self._errors: dict[str, str] = {}  # plugin name -> why it failed to load
        self._notes: list[str] = []  # entry points ignored (duplicates, built-in names)
        self._sources: dict[str, str] = {}  # plugin name -> distribution that provides it
        self._unavailable: dict[str, str] = {}  # names deliberately not offered -> why
        self._state = "new"  # new -> loading -> loaded

    def configure(self, base: type, check: Optional[Callable[[Any, str], Optional[str]]] = None) -> None:
        """Called by the plugin package: what a registered class must subclass, and its own checks of
        an entry-point class beyond the base class and the name."""
        self.base = base
        if check is not None:
            self.check = check

    # -- registering ----------------------------------------------------------------------------
    def register(self, cls: type) -> type:
        """Class decorator: the class's ``name`` becomes usable in recipes."""
        if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"@register_{self.kind}: {cls!r} is not a subclass of {_qualname(self.base)}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} needs a class attribute `name` (the recipe's {self.kind} name)")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise TypeError(f"{cls.__name__}.name '{name}': use letters, digits, '_' and '-' only")
        old = self._classes.get(name)
        if old is not None and _qualname(old) != _qualname(cls):  # re-registering on reload is fine
            raise TypeError(f"{self.kind} name '{name}' is already registered by {_qualname(old)}")
        self._classes[name] = cls
        return cls

    def register_unavailable(self, name: str, reason: str) -> None:
        """Record a name that is deliberately not offered, so asking for it explains why."""
        self._unavailable.setdefault(name, reason)

    # -- looking up -----------------------------------------------------------------------------
    def available(self) -> dict[str, type]:
        self._load()
        return dict(sorted(self._classes.items()))

    def get(self, name: str) -> type:
        found = self.available()
        if name in self._errors and name not in found:
            raise PeftlabError(f"{self.kind} plugin '{name}' failed to load: {self._errors[name]}")
        if name not in found and name in self._unavailable:
            raise PeftlabError(f"{self.kind} '{name}' is not available: {self._unavailable[name]}")
        if name not in found:
            close = difflib.get_close_matches(name, list(found), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PeftlabError(f"unknown {self.kind} '{name}'{hint}; known: {', '.join(found)}")
        return found[name]

    def source(self, name: str) -> str:
        return self._sources.get(name, "built-in")

    def problems(self) -> list[str]:
        """One line per entry-point plugin that failed to load or was ignored."""
        self._load()
        failed = [f"{self.kind} plugin '{n}' failed to load: {e}" for n, e in sorted(self._errors.items())]
        return failed + list(self._notes)

    # -- loading --------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._state != "new":  # "loading": a plugin module that looks names up while it is imported
            return
        self._state = "loading"
        try:
            importlib.import_module(self.package)
            for module in self.builtins:
                importlib.import_module(f"{self.package}.{module}")
            for module in self.optional:  # built-ins whose own dependencies may be missing
                try:
                    importlib.import_module(f"{self.package}.{module}")
                except ModuleNotFoundError as exc:
                    if exc.name != f"{self.package}.{module}":
                        raise
            self._load_entry_points()
            self._state = "loaded"
        finally:
            if self._state == "loading":
                self._state = "new"

    def _load_entry_points(self) -> None:
        seen: dict[str, str] = {}
        for ep in importlib.metadata.entry_points(group=self.group):
            dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
            where = f"entry point '{ep.name} = {ep.value}' ({dist})"
            if ep.name in seen:
                if seen[ep.name] != dist:
                    self._notes.append(f"{where} ignored: '{ep.name}' is already declared by {seen[ep.name]}")
                continue
            seen[ep.name] = dist
            existing = self._classes.get(ep.name)
            if existing is not None and existing.__module__.startswith(self.package + "."):
                self._notes.append(f"{where} ignored: '{ep.name}' is a built-in {self.kind}")
                continue
            self._load_entry_point(ep, where, dist)

    def _vet(self, cls: Any, ep_name: str) -> Optional[str]:
        """Why an entry point's target is not a usable plugin (the base class, the name, then the
        package's own check), or None."""
        if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
            return f"is not a subclass of {self.base.__module__}.{self.base.__name__}"
        name = cls.__dict__.get("name")  # an inherited name (a subclass of lora) takes the entry point's
        if name is not None and name != ep_name:
            return f"{cls.__name__}.name is '{name}' but the entry point is named '{ep_name}'; they must match"
        return self.check(cls, ep_name)

    def _load_entry_point(self, ep: Any, where: str, dist: str) -> None:
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the others
            first = (str(exc).strip().splitlines() or [""])[0]
            self._errors[ep.name] = f"{where}: {type(exc).__name__}: {first}".rstrip(": ")
            return
        problem = self._vet(cls, ep.name)
        if problem is None:
            if "name" not in cls.__dict__:
                cls.name = ep.name
            try:
                self.register(cls)
            except TypeError as exc:
                problem = str(exc)
        if problem is not None:
            self._errors[ep.name] = f"{where}: {problem}"
            if self._classes.get(ep.name) is cls:  # registered itself on import, but is unusable
                del self._classes[ep.name]
            return
        self._sources[ep.name] = dist


METHODS = Registry("method", "peftlab.methods", builtins=("full", "head", "lora"),
                   optional=("adapter", "prefix", "peft_tuner"))
TASKS = Registry("task", "peftlab.tasks",
                 builtins=("sequence_classification", "token_classification", "question_answering", "causal_lm"))
