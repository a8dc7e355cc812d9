"""Custom kernels with torch fallbacks: importable (and correct, on the fallback) without Triton or a GPU.

- w4a16: the INT4 routed-expert grouped matmul (decode GEMV and grouped prefill).
- max_logits: the per-head causal max logit that QK-Clip records every training step.
"""
