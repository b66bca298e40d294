"""gpt-oss: config, MXFP4 decode/encode, checkpoint I/O, expert math and the forward.

Names are resolved lazily so `import versa_kernels.gptoss.config` (stdlib only) does not pull in
torch or safetensors; the host side may read a checkpoint's config without them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GptOssConfig": "versa_kernels.gptoss.config",
    "Checkpoint": "versa_kernels.gptoss.checkpoint",
    "ShardedWriter": "versa_kernels.gptoss.checkpoint",
    "expected_tensor_names": "versa_kernels.gptoss.checkpoint",
    "decode_mxfp4": "versa_kernels.gptoss.mxfp4",
    "encode_mxfp4": "versa_kernels.gptoss.mxfp4",
    "route_topk": "versa_kernels.gptoss.expert_math",
    "swiglu": "versa_kernels.gptoss.expert_math",
    "moe_reference": "versa_kernels.gptoss.expert_math",
    "moe_grouped": "versa_kernels.gptoss.expert_math",
    "GptOssModel": "versa_kernels.gptoss.model",
    "ForwardOutput": "versa_kernels.gptoss.model",
    "MoeTrace": "versa_kernels.gptoss.model",
    "save_mxfp4_checkpoint": "versa_kernels.gptoss.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
