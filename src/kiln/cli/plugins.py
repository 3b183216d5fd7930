"""`kiln plugins`: every registered plugin with its fields, tactics and origin."""
from __future__ import annotations

import argparse
import json

from kiln.cli.base import Json, Plugins, Tool, register


@register
class ListPlugins(Tool):
    name = "plugins"
    help = "list registered plugins with their fields and origin"
    description = ("List every registered plugin: name, namespace, version, fields, tactics and where it came from "
                   "(built-in, file, entry point).")
    groups = (Plugins(), Json())

    def run(self, args: argparse.Namespace) -> int:
        from kiln.plugins import describe_fields, load_builtins, registry
        load_builtins()
        Plugins.load(args)
        items = registry.list()
        if args.json:
            print(json.dumps([{"name": c.name, "namespace": c.namespace, "version": c.version, "source": src,
                               "fields": describe_fields(c), "tactics": c.tactics} for c, src in items], indent=1))
            return 0
        if not items:
            print("No plugins registered.")
            return 0
        for cls, src in items:
            ns = f"{cls.namespace}::" if cls.namespace else ""
            print(f"{ns}{cls.name} v{cls.version}   from {src}")
            tac = ", ".join(f"{d}: {'/'.join(t)}" for d, t in cls.tactics.items())
            print(f"    tactics: {tac}")
            for f in describe_fields(cls):
                default = "required" if f["required"] else f"default {f['default']!r}"
                choices = f" one of {f['choices']}" if f["choices"] else ""
                print(f"    {f['name']}: {f['type']} ({default}){choices}")
        return 0
