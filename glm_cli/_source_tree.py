"""Import glm straight from a checkout, uninstalled: `glm_cli.core` and friends from the top-level dirs.

pyproject.toml installs the repository's top-level `core/`, `commands/`, `cuda_ext/` and `cpu_ext/` as
`glm_cli.core`, `glm_cli.commands`, ... (so pip never adds generic names such as `core` to an
environment). In a checkout, `glm_cli/` holds none of them, so wherever Python finds this `glm_cli`
through the path rather than through an install (`python -m glm_cli`, `python -m pytest` or
`torchrun -m glm_cli` with the repository root as working directory, on a GPU machine where nothing
is installed) `import glm_cli.core` would fail with ModuleNotFoundError.

`install()` puts one small finder at the front of `sys.meta_path` that maps exactly those four names
to the directories beside this `glm_cli/`, and only when this file sits in a checkout (a pyproject.toml
and a `core/` next to `glm_cli/`); an installed wheel has neither, and nothing changes there. The
finder answers only for the four names; their sub-modules are then found through the package's
`__path__` as usual. In an editable install it gives the very same directories the editable finder
would, so the result is identical; it goes first so that a `glm_cli` found in one checkout never gets
its `core` from another checkout's editable install (same tree, always).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# The same mapping as [tool.setuptools] package-dir in pyproject.toml (tests/cli/test_gpu_check.py
# checks the two agree).
SUBPACKAGES = {"glm_cli.core": "core", "glm_cli.commands": "commands", "glm_cli.cuda_ext": "cuda_ext",
               "glm_cli.cpu_ext": "cpu_ext"}


class SourceTreeFinder:
    """A meta-path finder for the four sub-packages of one checkout (`root`)."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname: str, path=None, target=None):
        directory = SUBPACKAGES.get(fullname)
        if directory is None:
            return None
        init = self.root / directory / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init,
                                                      submodule_search_locations=[str(init.parent)])

    def invalidate_caches(self) -> None:
        """Nothing cached (importlib.invalidate_caches calls this on every meta-path finder)."""


def checkout_root(package_dir: Path) -> Path | None:
    """The repository root when `package_dir` (this glm_cli/) sits in a checkout, else None."""
    root = package_dir.parent
    if (root / "pyproject.toml").is_file() and (root / "core" / "__init__.py").is_file():
        return root
    return None


def install(package_dir: Path) -> SourceTreeFinder | None:
    """Put the finder for this checkout first on sys.meta_path (once); None outside a checkout."""
    root = checkout_root(package_dir)
    if root is None:
        return None
    for finder in sys.meta_path:
        if isinstance(finder, SourceTreeFinder) and finder.root == root:
            return finder
    finder = SourceTreeFinder(root)
    sys.meta_path.insert(0, finder)
    return finder
