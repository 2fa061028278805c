"""glm: from raw text to a trained, aligned, quantized and evaluated language model.

The repository keeps `commands/`, `core/`, `cuda_ext/` and `cpu_ext/` at its top level; pyproject.toml
installs them as `glm_cli.commands`, `glm_cli.core`, ..., so nothing generic lands in site-packages. In
an uninstalled checkout (`python -m glm_cli` from the repository root) `_source_tree` maps the same
names to those directories.
"""

from pathlib import Path as _Path

from glm_cli import _source_tree

__version__ = "0.1.0"

_source_tree.install(_Path(__file__).resolve().parent)
