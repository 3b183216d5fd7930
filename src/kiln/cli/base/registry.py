"""Every `kiln` command: one module each in the kiln.cli package, found by listing the package."""
from __future__ import annotations

import pkgutil
from importlib import import_module

from kiln.cli.base.tool import MissingTool, Tool, registered

PACKAGE = "kiln.cli"


def tools() -> list[Tool]:
    """The commands, by name: each public module of kiln.cli (not a subpackage, not ``_``-prefixed) is
    imported, registering its Tool; a module that fails to import, or registers none, stays listed as a
    MissingTool under its module name."""
    package = import_module(PACKAGE)
    found: list[Tool] = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg or info.name.startswith("_"):
            continue
        module = f"{PACKAGE}.{info.name}"
        try:
            import_module(module)
        except Exception as exc:              # shown in --help and when run; a non-ImportError re-raises then
            found.append(MissingTool(info.name, module, exc))
            continue
        mine = registered(module)
        found += mine or [MissingTool(info.name, module, LookupError(
            f"{module} registers no command; decorate its Tool subclass with @register"))]
    return sorted(found, key=lambda t: t.name)
