"""Per-head max of the causal pre-softmax logits, the S_h that QK-Clip needs every training step.

SDPA does not return its row maxima, so the logits are computed a second time just for their max. Done
naively that materializes B x H x T x T scores (2 GiB per layer at batch 8 x 2048 x 16 heads, then a masked
copy and a reduction): a large share of a training step. The Triton kernel streams key blocks through
registers the way flash attention does and writes one number per (batch, head, query block), so the extra
cost is the QK^T FLOPs alone. Elsewhere (CPU, no Triton) a torch version computes query chunks.
"""

from __future__ import annotations

import torch

from moonlet.kernels import HAS_TRITON, autocast_dtype, tl, triton


def causal_max_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k [B, H, T, D] -> [H] fp32: max over batch and causal (query >= key) pairs of scale * q.k.
    Under CUDA autocast q and k are cast the way SDPA casts them, so the max is of the logits it computes."""
    dtype = autocast_dtype(q)
    q, k = q.to(dtype), k.to(dtype)
    if HAS_TRITON and q.is_cuda:
        return triton_causal_max_logits(q, k, scale)
    return torch_causal_max_logits(q, k, scale)


def torch_causal_max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """Query chunks, so memory is O(chunk * T) rather than O(T^2); fp32 logits."""
    T = q.shape[2]
    best = torch.full((q.shape[1],), float("-inf"), device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        for s in range(0, T, chunk):
            logits = (q[:, :, s : s + chunk].float() @ k.float().transpose(-1, -2)) * scale
            rows = torch.arange(s, min(s + chunk, T), device=q.device)[:, None]
            logits = logits.masked_fill(torch.arange(T, device=q.device)[None, :] > rows, float("-inf"))
            best = torch.maximum(best, logits.amax(dim=(0, 2, 3)))
    return best


def triton_causal_max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int = 64,
                             block_n: int = 64) -> torch.Tensor:
    """One program per (query block, batch x head); no host sync. Any strides (k may be an expanded view)
    as long as the head dim is contiguous."""
    B, H, T, D = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    n_m = triton.cdiv(T, block_m)
    out = torch.empty(B * H, n_m, device=q.device, dtype=torch.float32)
    _causal_max_kernel[(n_m, B * H)](
        q, k, out, T, H, D, *q.stride()[:3], *k.stride()[:3],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
        IEEE=q.dtype == torch.float32)
    # scale > 0 commutes with max (rounding is monotone), so scaling the maxima equals the max of scaled logits
    return out.view(B, H, n_m).amax(dim=(0, 2)) * scale


if HAS_TRITON:

    @triton.jit
    def _causal_max_kernel(q_ptr, k_ptr, out_ptr, T, H, D, sqb, sqh, sqt, skb, skh, skt,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :],
                    mask=(rows[:, None] < T) & (d[None, :] < D), other=0.0)
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for start in range(0, tl.minimum((pid_m + 1) * BLOCK_M, T), BLOCK_N):  # causal: keys up to the last row
            cols = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + b * skb + h * skh + cols[:, None] * skt + d[None, :],
                        mask=(cols[:, None] < T) & (d[None, :] < D), other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            keep = (cols[None, :] <= rows[:, None]) & (rows[:, None] < T)
            best = tl.maximum(best, tl.max(tl.where(keep, s, float("-inf")), axis=1))
        tl.store(out_ptr + bh * tl.num_programs(0) + pid_m, tl.max(best, axis=0))
