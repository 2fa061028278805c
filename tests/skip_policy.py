"""The skip reasons CI accepts, and the check `tests/conftest.py` runs at the end of a CI session.

CI runs on a 2-core machine without a GPU, with a C++ compiler and every test dependency installed
(`.ci/run`). There a skip may mean only that the hardware is absent: no CUDA device or toolkit, or a
CPU without an instruction set a kernel needs. Anything else (a missing package, a failed native
build, golden numbers from another torch, no compiler) is a failure that a skip would hide, so CI
fails on it. Outside CI (`CI` unset) skips stay skips: a user's machine may lack any of these.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

# One pattern a reason; a reason is allowed when one of them matches it (re.search).
ALLOWED_SKIPS: dict[str, str] = {
    r"^needs a CUDA device$": "no CUDA device",
    r"^needs compute capability \d": "a CUDA device older than the kernel needs",
    r"^needs a CUDA device of compute capability \d": "no CUDA device, or one older than the kernel needs",
    r"^nvcc is not installed$": "no CUDA toolkit",
    r"^needs nvcc's headers": "no CUDA toolkit",
    r"\bthis CPU lacks$": "a CPU feature absent (oneDNN's bf16 path)",
    r"^the CPU lacks AVX2/FMA\b": "a CPU feature absent (glm's native kernels)",
}


def ci_enforced(environ: Mapping[str, str]) -> bool:
    """CI services set CI=true (GitHub Actions, GitLab, Buildkite, .ci/run)."""
    return environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def allowed(reason: str) -> bool:
    return any(re.search(pattern, reason) for pattern in ALLOWED_SKIPS)


def skip_reason(report) -> str:
    """The reason a skipped pytest report gives, without pytest's "Skipped: " prefix."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ").strip()


def disallowed_skips(reasons: Iterable[str]) -> dict[str, int]:
    """The reasons not on the allowlist, each with how many skips gave it."""
    return dict(Counter(r for r in reasons if not allowed(r)))
