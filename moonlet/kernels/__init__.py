"""Custom kernels with torch fallbacks: importable (and correct, on the fallback) without Triton or a GPU.

- w4a16: the INT4 routed-expert grouped matmul (decode GEMV and grouped prefill).
- max_logits: the per-head causal max logit that QK-Clip records every training step.
"""

from __future__ import annotations

import torch

try:  # optional: the package must import (and run, on the fallback) without Triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None
    HAS_TRITON = False


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype CUDA autocast computes x's matmuls in (x's own dtype when autocast is off). Ops without an
    autocast rule (torch._grouped_mm, our Triton kernels) must cast to it themselves."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype
