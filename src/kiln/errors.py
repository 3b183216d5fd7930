"""One error hierarchy for everything a user can get wrong.

Messages are full sentences naming the thing and the fix; the CLI prints
``str(error)`` on one line and exits 2 for any ``KilnError``.
"""
from __future__ import annotations


class KilnError(Exception):
    """Base of every error Kiln raises for bad input or an impossible request."""


class ParseError(KilnError):
    """The model file is malformed or uses something the parser cannot map."""


class UnsupportedOperatorError(ParseError):
    """A node has no converter and no registered plugin."""


class NetworkError(KilnError):
    """A hand-built or parsed network is inconsistent (verification failed)."""


class ShapeError(KilnError):
    """Shapes do not fit: outside a profile, or incompatible between layers."""


class BuildError(KilnError):
    """The builder cannot produce an engine for this network and config."""


class EngineFormatError(KilnError):
    """The file is damaged, truncated or not a Kiln engine at all."""


class IncompatibleEngineError(KilnError):
    """The engine was built for another device or engine-format version."""


class PluginError(KilnError):
    """A plugin is missing, registered twice, or was given bad fields."""


class ViewerError(KilnError):
    """The viewer cannot read or show a file."""
