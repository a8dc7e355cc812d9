"""The language-model head and its cross-entropy, fused and computed a chunk of tokens at a time.

A training step's logits are its largest tensors: at 8 x 2048 tokens and a 32768-id vocab, 1 GiB in bf16, 2 GiB
again in fp32, as much for the log-softmax and as much for its gradient. Here each chunk of tokens goes through the
head, the loss and the gradient of its logits (softmax - one-hot) at once, in the forward, so only one chunk's
logits are ever alive and the backward just scales the gradients already computed (as Liger-Kernel's fused
linear cross-entropy does). The numerics follow the unfused path: logits in the matmul dtype (bf16 under autocast),
the softmax in fp32, the logit gradient cast back to the matmul dtype for the two backward matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moonlet.kernels import autocast_dtype

# logit elements per chunk: 64M (256 MiB in fp32) is 2048 tokens of a 32768-id vocab, 409 of K2's 163840 ids
CHUNK_ELEMENTS = 1 << 26


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, coef, dtype, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)
        ce = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk].to(dtype), targets[s:s + chunk, None]
            logits = (hc @ w.T).float()
            lse = logits.logsumexp(-1, keepdim=True)
            ce[s:s + chunk] = (lse - logits.gather(1, tc)).squeeze(1)
            if need_h or need_w:
                g = logits.sub_(lse).exp_()  # softmax, in place of the logits
                g.scatter_add_(1, tc, torch.full_like(tc, -1, dtype=g.dtype)).mul_(coef[s:s + chunk, None])
                g = g.to(dtype)
                if need_h:
                    grad_h[s:s + chunk] = g @ w
                if need_w and dtype == torch.float32:
                    grad_w.addmm_(g.T, hc)  # accumulates inside the GEMM
                elif need_w:
                    grad_w += g.T @ hc  # a half-precision GEMM's result, summed over chunks in fp32
        ctx.mark_non_differentiable(ce)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return (ce * coef).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss if grad_h is not None else None  # a 0-dim factor keeps grad_h's dtype
        grad_w = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


def head_cross_entropy(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                       coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [..., D] (the final norm's output), targets [...] -> (sum of coef * ce, the per-token ce [N] fp32,
    detached). coef [...] weighs each token's loss: the loss mask over the number of targets, for a mean.

    Runs the model's `lm_head` on chunks of tokens; a head that is not a plain bias-free Linear (QAT's
    fake-quantized one) takes the unfused path, with the same result."""
    head = model.lm_head
    h, t, c = hidden.flatten(0, -2), targets.flatten(), coef.flatten().float()
    if type(head) is not nn.Linear or head.bias is not None:
        ce = F.cross_entropy(head(h).float(), t, reduction="none")
        return (ce * c).sum(), ce.detach()
    rows = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    return _HeadCrossEntropy.apply(h, head.weight, t, c, autocast_dtype(h), rows)
