"""Optional packages, imported where a feature needs them, so that a missing one costs the user one line
with the install command instead of a traceback (glm's own dependencies stay small)."""

from __future__ import annotations

import importlib
from types import ModuleType

from glm_cli.core.errors import GlmError


def require(module: str, purpose: str, install: str | None = None) -> ModuleType:
    """Import `module`, or raise a GlmError naming the feature and the pip command that enables it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise GlmError(f"{purpose} needs the Python package '{module}': "
                       f"pip install {install or module}") from None
