"""glm: from raw text to a trained, aligned, quantized and evaluated language model.

The repository keeps `commands/`, `core/` and `cuda_ext/` at its top level; pyproject.toml installs them
as `glm_cli.commands`, `glm_cli.core` and `glm_cli.cuda_ext`, so nothing generic lands in site-packages.
"""

__version__ = "0.1.0"
