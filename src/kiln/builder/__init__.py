"""Build engines: BuildConfig, Profile, build()."""
from __future__ import annotations

from kiln.builder.build import build
from kiln.builder.config import BuildConfig, Profile

__all__ = ["BuildConfig", "Profile", "build"]
