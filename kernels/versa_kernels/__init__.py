"""versa_kernels: gpt-oss MoE math, MXFP4 checkpoints, EAFT-REAP pruning and parity metrics.

The GPU-side package. It never knows where it runs (Kaggle, SSH box, this laptop); the host
side (`versa_runner`) only ships it to the target and runs notebooks that call into it.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
