"""A `kiln` command as a Tool: its name, help, the shared argument groups it takes, its own arguments
and ``run(args)``; and MissingTool, the stand-in for a command whose module failed to import."""
from __future__ import annotations

import argparse
import re
from typing import Sequence, TypeVar

from kiln.cli.base.groups import ArgGroup
from kiln.errors import KilnError

T = TypeVar("T", bound="type[Tool]")


class Tool:
    """One `kiln` command, defined in ``kiln/cli/<name>.py`` and registered with :func:`register`.

    ``help`` is its line in ``kiln --help``; ``groups`` are the shared flags it takes; ``add_arguments``
    adds its own. ``run`` does the work and returns the exit code; it imports heavy modules itself, so
    that building the parser (``kiln --help``) stays light. A user error is a KilnError (one line, exit 2).
    """

    name: str = ""
    help: str = ""
    description: str = ""
    groups: Sequence[ArgGroup] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the command's own arguments (the shared groups are added after them)."""

    def add_parser(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """The command's parser, added to ``subparsers``."""
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description or self.help)
        self.add_arguments(parser)
        for group in self.groups:
            group.add_to(parser)
        parser.set_defaults(func=self.run, tool=self)
        return parser

    def run(self, args: argparse.Namespace) -> int:
        """Do the command's work; the exit code (0 success, 1 a negative answer such as a failed check)."""
        raise NotImplementedError


_by_module: dict[str, list[Tool]] = {}


def register(cls: T) -> T:
    """Class decorator: make ``cls`` a `kiln` command. Two commands of one name are refused."""
    tool = cls()
    if not re.fullmatch(r"[a-z][a-z0-9-]*", tool.name or ""):
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} needs a command name (lowercase letters, digits, "
                        f"'-'); got {tool.name!r}.")
    for module, tools in _by_module.items():
        for other in tools:
            same_class = (module, type(other).__qualname__) == (cls.__module__, cls.__qualname__)
            if other.name == tool.name and not same_class:
                raise TypeError(f"Command {tool.name!r} is defined twice: in {module} and in {cls.__module__}.")
    mine = [t for t in _by_module.get(cls.__module__, []) if type(t).__qualname__ != cls.__qualname__]
    _by_module[cls.__module__] = [*mine, tool]
    return cls


def registered(module: str) -> list[Tool]:
    """The tools that ``module`` registered when it was imported."""
    return list(_by_module.get(module, ()))


class MissingTool(Tool):
    """A command whose module failed to import: listed in ``kiln --help`` with the reason; running it
    prints that reason in one line and exits 2. Any other failure than an ImportError is a bug in the
    module and is raised with its traceback when the command runs."""

    def __init__(self, name: str, module: str, error: BaseException) -> None:
        self.name, self.module, self.error = name, module, error
        self.reason = import_failure(name, error)
        self.help = f"(unavailable: {self.reason})"
        self.description = f"The {name!r} command is unavailable ({module} failed to import): {self.reason}."

    def run(self, args: argparse.Namespace) -> int:
        if isinstance(self.error, ImportError):
            raise KilnError(self.description)
        raise self.error


def import_failure(command: str, error: BaseException) -> str:
    """Why a command module could not be imported, in one phrase, with the pip line that fixes a missing
    optional dependency of kiln."""
    text = " ".join(str(error).split()) or type(error).__name__
    missing = getattr(error, "name", None) if isinstance(error, ImportError) else None
    extra = optional_extra(missing.split(".")[0], command) if missing else None
    if extra:
        return f"{text}; install it with: pip install 'kiln[{extra}]'"
    return text if isinstance(error, ImportError) else f"{type(error).__name__}: {text}"


# import names whose distribution on PyPI has another name
_DISTRIBUTIONS = {"grpc": "grpcio", "google": "protobuf", "PIL": "pillow", "yaml": "pyyaml", "cv2": "opencv-python"}


def optional_extra(module: str, command: str = "") -> str | None:
    """The kiln extra (``pip install 'kiln[EXTRA]'``) that installs top-level module ``module``, read from
    kiln's package metadata; an extra named like ``command`` first, never the test extra."""
    from importlib import metadata
    try:
        requires = metadata.requires("kiln") or []
    except metadata.PackageNotFoundError:
        return None
    want = _normal(_DISTRIBUTIONS.get(module, module))
    extras = []
    for req in requires:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*).*;.*\bextra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if m and _normal(m.group(1)) == want and m.group(2) != "test":
            extras.append(m.group(2))
    return command if command in extras else extras[0] if extras else None


def _normal(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()
