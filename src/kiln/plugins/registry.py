"""The plugin registry: TensorRT's plugin creator/factory, as one small object.

Plugins enter it by ``@register`` at import time, by ``load(path_or_module)``
(``kiln build --plugins my_plugins.py``) or from installed packages through the
``kiln.plugins`` entry-point group. Engines name plugins by (name, namespace,
version); the registry re-creates them from their recorded fields.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
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
            if key in self._plugins and self._plugins[key] is not cls:
                raise PluginError(
                    f"Plugin {cls.key_str()} is already registered (from {self._sources[key]}); "
                    f"give the new one another version or namespace, or unregister the old one first.")
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
            mod_name = f"kiln_user_plugins_{abs(hash(str(path.resolve())))}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise PluginError(f"Cannot import {target!r} as Python; --plugins takes a .py file or a module name.")
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except PluginError:
                raise
            except Exception as exc:
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
