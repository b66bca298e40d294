"""versa_runner: run parameterized gpt-oss pruning notebooks on borrowed GPUs.

Host side only: it never imports torch at import time. The GPU-side science lives in
`versa_kernels` (source root `kernels/`).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
