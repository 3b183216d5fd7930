"""The plugin registry: TensorRT's plugin creator/factory, as one small object.

Plugins enter it by ``@register`` at import time, by ``load(path_or_module)``
(``kiln build --plugins my_plugins.py``) or from installed packages through the
``kiln.plugins`` entry-point group. Engines name plugins by (name, namespace,
version); the registry re-creates them from their recorded fields.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import pathlib
import sys
import threading
from typing import Any

from kiln.errors import PluginError
from kiln.plugins.base import Plugin

ENTRY_POINT_GROUP = "kiln.plugins"


class PluginRegistry:
    def __init__(self) -> None:
        self._plugins: dict[tuple[str, str, str], type[Plugin]] = {}
        self._sources: dict[tuple[str, str, str], str] = {}
        self._lock = threading.RLock()
        self._entry_points_loaded = False

    def register(self, cls: type[Plugin], source: str | None = None) -> type[Plugin]:
        if not (isinstance(cls, type) and issubclass(cls, Plugin)) or not cls.name:
            raise PluginError(f"{cls!r} is not a Plugin subclass with a name; subclass kiln.Plugin and set name.")
        key = cls.key()
        with self._lock:
            old = self._plugins.get(key)
            if old is not None and old is not cls:
                if _definition(old) != _definition(cls):
                    raise PluginError(
                        f"Plugin {cls.key_str()} is already registered (from {self._sources[key]}); "
                        f"give the new one another version or namespace, or unregister the old one first.")
                return cls           # the same class statement run again (its file imported twice): one plugin
            self._plugins[key] = cls
            self._sources[key] = source or _source_of(cls)
        return cls

    def unregister(self, name: str, namespace: str = "", version: str = "1") -> None:
        with self._lock:
            self._plugins.pop((name, namespace, str(version)), None)
            self._sources.pop((name, namespace, str(version)), None)

    def find(self, name: str, namespace: str = "", version: str | None = None) -> type[Plugin] | None:
        """Exact match, or the highest version when ``version`` is None."""
        self.load_entry_points()
        with self._lock:
            if version is not None:
                return self._plugins.get((name, namespace, str(version)))
            found = [c for (n, ns, _), c in self._plugins.items() if n == name and ns == namespace]
        return max(found, key=lambda c: _version_key(c.version)) if found else None

    def get(self, name: str, namespace: str = "", version: str = "1") -> type[Plugin]:
        cls = self.find(name, namespace, version)
        if cls is None:
            ns = f"{namespace}::" if namespace else ""
            raise PluginError(
                f"Plugin {ns}{name} v{version} is not registered; import or load the module that defines it "
                f"(kiln.plugins.load('my_plugins.py') or --plugins my_plugins.py) before loading or building.")
        return cls

    def create(self, record: dict[str, Any]) -> Plugin:
        """Re-create a plugin instance from an engine's record (the plugin factory)."""
        cls = self.get(record["name"], record.get("namespace", ""), str(record.get("version", "1")))
        return cls(**record.get("fields", {}))

    def list(self) -> list[tuple[type[Plugin], str]]:
        self.load_entry_points()
        with self._lock:
            return [(self._plugins[k], self._sources[k]) for k in sorted(self._plugins)]

    def load(self, target: str) -> list[type[Plugin]]:
        """Import a module by dotted name or a ``.py`` file by path; return the plugins it added."""
        before = set(self._plugins)
        path = pathlib.Path(target)
        if target.endswith(".py") or path.exists():
            if not path.is_file():
                raise PluginError(f"Plugin file {target!r} does not exist; check the path given to --plugins.")
            resolved = path.resolve()
            if _imported_module(resolved) is not None:      # already imported (by name or an earlier load)
                return []
            mod_name = f"kiln_user_plugins_{hashlib.sha256(str(resolved).encode()).hexdigest()[:16]}"
            spec = importlib.util.spec_from_file_location(mod_name, resolved)
            if spec is None or spec.loader is None:
                raise PluginError(f"Cannot import {target!r} as Python; --plugins takes a .py file or a module name.")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException as exc:
                sys.modules.pop(mod_name, None)             # not cached: a fixed file loads on the next try
                if isinstance(exc, PluginError) or not isinstance(exc, Exception):
                    raise
                raise PluginError(f"Importing plugin file {target!r} failed: {type(exc).__name__}: {exc}") from exc
        else:
            try:
                importlib.import_module(target)
            except ImportError as exc:
                raise PluginError(f"Cannot import plugin module {target!r} ({exc}); install it or pass a .py path.") from exc
        return [self._plugins[k] for k in sorted(set(self._plugins) - before)]

    def load_entry_points(self) -> None:
        """Register plugins that installed packages advertise under ``kiln.plugins``."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
            except Exception as exc:
                raise PluginError(f"Plugin entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
            items = obj if isinstance(obj, (list, tuple)) else [obj]
            for item in items:
                if isinstance(item, type) and issubclass(item, Plugin):
                    if item.key() not in self._plugins:
                        self.register(item, source=f"entry point {ep.name} ({ep.value})")


def plugin_records(plan: dict) -> list[dict]:
    """The plugin records (``{"name", "namespace", "version", "fields"}``) an engine plan holds, subgraphs
    included, in layer order."""
    out: list[dict] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            if "__plugin__" in v:
                out.append(v["__plugin__"])
            elif "__graph__" in v:
                for layer in v["__graph__"]["layers"]:
                    walk(layer.get("attrs", {}))
            else:
                for x in v.values():
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    for layer in plan["layers"]:
        walk(layer.get("attrs", {}))
    return out


def _imported_module(path: pathlib.Path) -> Any:
    """The module already imported from file ``path``, if any."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and os.path.basename(file) == path.name:
            try:
                if pathlib.Path(file).resolve() == path:
                    return module
            except OSError:
                continue
    return None


def _definition(cls: type) -> tuple:
    """What identifies a plugin class statement across imports of its file: its qualified name, where
    its own functions are written (file and line) and its own data attributes. A file imported twice
    gives equal definitions; two different classes give different ones."""
    code, data = [], []
    for key, value in sorted(vars(cls).items()):
        fn = value.fget if isinstance(value, property) else getattr(value, "__func__", getattr(value, "func", value))
        co = getattr(fn, "__code__", None)
        if co is not None:
            code.append((key, _real(co.co_filename), co.co_firstlineno, co.co_code))
        elif not key.startswith("__"):
            data.append((key, repr(value)))
    return cls.__qualname__, _real(_source_of(cls)), tuple(code), tuple(data)


def _real(path: str) -> str:
    return os.path.realpath(path) if os.path.isabs(path) or os.path.exists(path) else path


def _source_of(cls: type) -> str:
    try:
        return inspect.getsourcefile(cls) or cls.__module__
    except TypeError:
        return cls.__module__


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in str(v).split("."))


registry = PluginRegistry()


def register(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: ``@kiln.plugins.register`` adds the plugin to the global registry."""
    return registry.register(cls)


def load(target: str) -> list[type[Plugin]]:
    return registry.load(target)
