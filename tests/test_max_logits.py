"""QK-Clip's per-head max logit: the Triton kernel (CUDA, or Triton's CPU interpreter) and the torch fallback
both equal a float64 brute force over every causal (query >= key) pair."""

import pytest
import torch

from moonlet.kernels import max_logits as ML

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def brute_force(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    logits = q.double() @ k.double().transpose(-1, -2) * scale
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return logits.masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3))


def qk(B=2, H=3, T=100, D=24, shift=0.0, seed=0, dtype=torch.float32):
    """q, k [B,H,T,D] as the model makes them: transposed views of [B,T,H,D] tensors (not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g) + shift
    k = torch.randn(B, T, H, D, generator=g) - shift  # shift != 0: every logit negative
    return q.to(DEVICE, dtype).transpose(1, 2), k.to(DEVICE, dtype).transpose(1, 2)


@pytest.mark.parametrize("shift", [0.0, 2.0], ids=["mixed-sign", "all-negative"])
def test_torch_path_equals_brute_force(shift):
    q, k = qk(shift=shift)
    got = ML.torch_causal_max_logits(q, k, 0.3, chunk=32)  # several chunks, the last one partial
    torch.testing.assert_close(got.double(), brute_force(q, k, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(2, 3, 100, 24), (1, 2, 64, 32), (1, 1, 7, 16)],
                         ids=["T-not-a-block-multiple", "T-one-block", "T-below-a-block"])
@pytest.mark.parametrize("shift", [0.0, 2.0], ids=["mixed-sign", "all-negative"])
def test_triton_kernel_equals_brute_force(shape, shift):
    B, H, T, D = shape
    q, k = qk(B, H, T, D, shift=shift)
    got = ML.triton_causal_max_logits(q, k, 0.3, block_m=16, block_n=16)
    torch.testing.assert_close(got.double(), brute_force(q, k, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
def test_triton_kernel_in_half_precision_matches_fp32_accumulation():
    """Low-precision inputs, fp32 accumulation: the logits SDPA itself computes (fp16 here: the interpreter's
    bf16 tl.dot is broken; CUDA runs the same kernel on bf16 under autocast)."""
    q, k = qk(dtype=torch.float16)
    got = ML.triton_causal_max_logits(q, k, 0.3, block_m=32, block_n=16)
    torch.testing.assert_close(got.double(), brute_force(q, k, 0.3), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_under_bf16_autocast_the_max_is_of_the_bf16_logits_sdpa_sees():
    q, k = qk(B=4, H=16, T=2048, D=96)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = ML.causal_max_logits(q, k, 0.125)
    ref = brute_force(q.bfloat16(), k.bfloat16(), 0.125)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-3)
