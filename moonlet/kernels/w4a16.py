"""W4A16 grouped MoE matmul: bf16 activations times int4 routed-expert weights (compressed-tensors
pack-quantized: int32 [E, N, K/8] with nibble j of word g = column 8g+j, scales [E, N, K/group]).

PyTorch has no int4 grouped GEMM, so moonlet brings its own (Triton on CUDA):
- decode (few rows): one program per (token-expert row, N tile), a GEMV that reads only the experts the
  tokens were routed to; at batch 1 that is all the weight traffic there is (top-k of E experts). It is
  bound by how many bytes are in flight, so on CUDA its tile shape is autotuned per (rows, N, K): from
  many narrow programs that each read a whole row in one go to wider ones that loop over K.
- prefill (many rows): rows are sorted by expert; each program owns BLOCK_M rows of one expert and an N tile
  and runs tl.dot on tiles dequantized in registers. Blocks are planned on the device (no host sync).
gate and up share one pass that writes silu(gate) * up; down is the same kernel without the SwiGLU.
On the CPU with bf16 activations, torch's own int4 GEMM (aten._weight_int4pack_mm_for_cpu) on a copy of
the experts in its layout, made once per expert (Int4Experts keeps it). Everywhere else (fp32 activations,
shapes it does not take, no Triton) a torch fallback dequantizes only the active experts and calls F.linear.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moonlet.kernels import HAS_TRITON, tl, triton
from moonlet.quant import PROJS, dequantize, unpack

DECODE_MAX_ROWS = int(os.environ.get("MOONLET_W4A16_GEMV_MAX_ROWS", 16))  # up to this many token-expert rows: GEMV
# GEMV tiles (BLOCK_N, BLOCK_K, num_warps, WORDS) tried on CUDA, all free of register spills on sm_90 (python -m
# moonlet.kernels.aot; a test holds it); Triton's interpreter (CPU tests) cannot time them and runs the first.
# WORDS=0 dequantizes a [BLOCK_N, BLOCK_K] tile (a reshape of the nibbles: a layout change through shared
# memory); WORDS=1 never unpacks the tile: per nibble j it multiplies the words' j-th values by x's every
# 8th column and scales each word's sum once (the 8 columns of a word share a scale). The H200's first run
# timed only WORDS=0 tiles (best: 4 x 1024, ~0.7 TB/s at batch 1); the autotuner keeps whichever is faster.
GEMV_TILES = [(32, 128, 4, 0), (16, 256, 4, 0), (8, 512, 4, 0), (4, 1024, 4, 0), (8, 1024, 8, 0), (4, 2048, 8, 0),
              (8, 1024, 4, 1), (16, 512, 4, 1), (16, 1024, 8, 1), (32, 512, 8, 1)]
# grouped-GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps): few rows per expert (under 32 on average), many
GEMM_TILES = {"few": (16, 64, 64, 4), "many": (64, 64, 64, 4)}


def use_triton(x: torch.Tensor, group_size: int) -> bool:
    pow2 = group_size >= 8 and group_size & (group_size - 1) == 0
    return HAS_TRITON and x.is_cuda and pow2


def w4a16_grouped_swiglu(xs: torch.Tensor, counts: torch.Tensor, gate_packed: torch.Tensor, gate_scale: torch.Tensor,
                         up_packed: torch.Tensor, up_scale: torch.Tensor, down_packed: torch.Tensor,
                         down_scale: torch.Tensor) -> torch.Tensor:
    """xs [M, D] sorted by expert, counts [E] -> down(silu(gate(x)) * up(x)) [M, D] with int4 expert weights."""
    group_size = xs.shape[-1] // gate_scale.shape[-1]
    if use_triton(xs, group_size):
        return torch.ops.moonlet.w4a16_swiglu(xs, counts, gate_packed, gate_scale, up_packed, up_scale, down_packed,
                                              down_scale)
    return torch_grouped_swiglu(xs, counts, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale)


def w4a16_grouped_matmul(xs: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """xs [M, K] sorted by expert, counts [E] -> xs_e @ W_e^T [M, N] for one stacked int4 weight."""
    if use_triton(xs, xs.shape[-1] // scale.shape[-1]):
        return _triton_matmul(xs.contiguous(), counts, packed, scale, None, None)
    outs = [F.linear(xe, dequantize(unpack(packed[e]), scale[e], xe.dtype))
            for e, xe in enumerate(xs.split(counts.tolist())) if xe.shape[0]]
    return torch.cat(outs) if outs else xs.new_zeros(0, packed.shape[1])


# ------------------------------------------------------------------------------------------------------
# CPU: torch's int4 weight-only GEMM for 16-bit activations


CPU_INT4_KERNEL = os.environ.get("MOONLET_CPU_INT4_KERNEL", "1") != "0"  # 0: no kept copies (memory), fallback


def use_cpu_int4pack(xs: torch.Tensor, out_dims: list[int], group_size: int) -> bool:
    """torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu: AVX2/AVX-512 with bf16 activations) takes
    groups of 32-256 and output dims that are multiples of 16. fp32 activations keep the exact fallback, and
    so does MOONLET_CPU_INT4_KERNEL=0 (the kernel's copies of the experts cost another 0.5 byte per weight)."""
    return (CPU_INT4_KERNEL and xs.device.type == "cpu" and xs.dtype == torch.bfloat16
            and group_size in (32, 64, 128, 256) and all(n % 16 == 0 for n in out_dims)
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def cpu_int4pack(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's packed weight [N, K/8] and scale [N, K/group] in the CPU kernel's layout: uint8 [N, K/2]
    blocked by rows, and scales-and-zeros [K/group, N, 2] bf16 (zero 0: the kernel computes (q - 8) * s + z
    on the unsigned nibble q, which is compressed-tensors' symmetric value times its scale)."""
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(packed).to(torch.int32) + 8, 2)
    s = scale.t().to(torch.bfloat16)
    return w, torch.stack([s, torch.zeros_like(s)], -1).contiguous()


def cpu_int4pack_swiglu(xs: torch.Tensor, counts: torch.Tensor, weights, group_size: int) -> torch.Tensor:
    """Like torch_grouped_swiglu, with each active expert's three matmuls in torch's int4 kernel, which reads
    the packed weight (a 1408 x 2048 expert at batch 1 on one thread: ~0.2 ms, against ~0.5 ms for the same
    matmul in fp32 and ~15 ms for dequantize + F.linear). `weights(proj, e)` gives the cpu_int4pack pair."""
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    outs = []
    for e, xe in enumerate(xs.split(counts.tolist())):
        if xe.shape[0]:
            (w_gate, sz_gate), (w_up, sz_up), (w_down, sz_down) = (weights(p, e) for p in PROJS)
            h = F.silu(mm(xe, w_gate, group_size, sz_gate)) * mm(xe, w_up, group_size, sz_up)
            outs.append(mm(h, w_down, group_size, sz_down))
    return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[1])


# ------------------------------------------------------------------------------------------------------
# torch fallback


def torch_grouped_swiglu(xs, counts, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale):
    """Loop over the experts that got tokens; dequantize each one's weights just for its matmul."""
    outs = []
    for e, xe in enumerate(xs.split(counts.tolist())):
        if xe.shape[0]:
            g = F.linear(xe, dequantize(unpack(gate_packed[e]), gate_scale[e], xe.dtype))
            u = F.linear(xe, dequantize(unpack(up_packed[e]), up_scale[e], xe.dtype))
            outs.append(F.linear(F.silu(g) * u, dequantize(unpack(down_packed[e]), down_scale[e], xe.dtype)))
    return torch.cat(outs) if outs else xs.new_zeros(0, down_packed.shape[1])


# ------------------------------------------------------------------------------------------------------
# Triton


def triton_grouped_swiglu(xs, counts, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale,
                          gemv_tile: tuple[int, int, int, int] | None = None):
    """`gemv_tile` (BLOCK_N, BLOCK_K, num_warps, WORDS) replaces the autotuned GEMV tile (tests try each one)."""
    xs = xs.contiguous()
    h = _triton_matmul(xs, counts, gate_packed, gate_scale, up_packed, up_scale, gemv_tile)  # silu(gate) * up
    return _triton_matmul(h, counts, down_packed, down_scale, None, None, gemv_tile)


@torch.library.custom_op("moonlet::w4a16_swiglu", mutates_args=())
def _w4a16_swiglu_op(xs: torch.Tensor, counts: torch.Tensor, gate_packed: torch.Tensor, gate_scale: torch.Tensor,
                     up_packed: torch.Tensor, up_scale: torch.Tensor, down_packed: torch.Tensor,
                     down_scale: torch.Tensor) -> torch.Tensor:
    """triton_grouped_swiglu as one opaque op: torch.compile (the compiled decode step each CUDA graph
    captures) calls it as it is instead of tracing into the autotuned Triton launches."""
    return triton_grouped_swiglu(xs, counts, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale)


@_w4a16_swiglu_op.register_fake
def _(xs, counts, gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale):
    return xs.new_empty(xs.shape[0], down_packed.shape[1])


def _block_table(counts: torch.Tensor, M: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """For each program row-block: its expert (-1: nothing to do), first row and end row. Computed with
    device ops from `counts`; the grid size is a host-side upper bound (ceil(M / block_m) + min(E, M))."""
    E = counts.numel()
    counts = counts.to(torch.int64)
    blocks = (counts + block_m - 1) // block_m
    last_block = blocks.cumsum(0)
    ends = counts.cumsum(0)
    n_prog = (M + block_m - 1) // block_m + min(E, M)
    b = torch.arange(n_prog, device=counts.device)
    e = torch.searchsorted(last_block, b, right=True)
    valid = e < E
    e = e.clamp(max=E - 1)
    row = ends[e] - counts[e] + (b - (last_block[e] - blocks[e])) * block_m
    expert = torch.where(valid, e, torch.full_like(e, -1))
    return expert.to(torch.int32), row.to(torch.int32), ends[e].to(torch.int32), n_prog


def _triton_matmul(x: torch.Tensor, counts: torch.Tensor, p1: torch.Tensor, s1: torch.Tensor,
                   p2: torch.Tensor | None, s2: torch.Tensor | None,
                   gemv_tile: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """y = x_e @ W1_e^T, or silu(x_e @ W1_e^T) * (x_e @ W2_e^T) when W2 is given; x [M, K] sorted by expert."""
    M, K = x.shape
    E, N = p1.shape[0], p1.shape[1]
    group = K // s1.shape[-1]
    swiglu = p2 is not None
    p1, s1 = p1.contiguous(), s1.contiguous()
    p2, s2 = (p2.contiguous(), s2.contiguous()) if swiglu else (p1, s1)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    common = dict(N=N, K=K, stride_xm=x.stride(0), stride_pe=p1.stride(0), stride_pn=p1.stride(1),
                  stride_se=s1.stride(0), stride_sn=s1.stride(1), stride_ym=y.stride(0), GROUP=group,
                  SWIGLU=swiglu)
    if M <= DECODE_MAX_ROWS:
        rows = torch.repeat_interleave(torch.arange(E, device=x.device, dtype=torch.int32), counts, output_size=M)
        grid = lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]))
        if gemv_tile is None:
            _w4a16_gemv_kernel[grid](x, rows, p1, s1, p2, s2, y, M, **common)
        else:
            n, k, warps, words = gemv_tile
            _w4a16_gemv_kernel.fn[grid](x, rows, p1, s1, p2, s2, y, M, BLOCK_N=n, BLOCK_K=max(k, group), WORDS=words,
                                        num_warps=warps, **common)
        return y
    BLOCK_M, BLOCK_N, BLOCK_K, warps = GEMM_TILES["few" if M < 32 * E else "many"]
    expert, row, end, n_prog = _block_table(counts, M, BLOCK_M)
    grid = (n_prog, triton.cdiv(N, BLOCK_N))
    _w4a16_grouped_gemm_kernel[grid](x, expert, row, end, p1, s1, p2, s2, y, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                     BLOCK_K=max(BLOCK_K, group), IEEE=x.dtype == torch.float32, num_warps=warps,
                                     **common)
    return y


def tuned_gemv_tiles() -> dict[str, str]:
    """The GEMV tile the autotuner picked for each (rows, N, K, swiglu) seen so far (for benchmark reports)."""
    cache = getattr(_w4a16_gemv_kernel, "cache", {}) if HAS_TRITON else {}
    return {str(key[:4]): str(config) for key, config in cache.items()}


def _gemv_configs() -> list:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "WORDS": words}, num_warps=w)
            for n, k, w, words in GEMV_TILES[: 1 if interpret else None]]


def _gemv_prune(configs: list, nargs: dict, **kwargs) -> list:
    """A tile covers whole quantization groups: BLOCK_K >= GROUP (a multiple, both powers of 2)."""
    group = kwargs.get("GROUP", nargs.get("GROUP"))
    return [c for c in configs if c.kwargs["BLOCK_K"] >= group] or [triton.Config({"BLOCK_N": 32, "BLOCK_K": group,
                                                                                     "WORDS": 0})]


if HAS_TRITON:

    @triton.jit
    def _dequant_tile(P, S, e, offs_n, n_mask, k0, K, stride_pe, stride_pn, stride_se, stride_sn,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Expert e's weight tile [BLOCK_N, BLOCK_K] at column k0, as exact fp32 q * scale."""
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        p = tl.load(P + e * stride_pe + offs_n[:, None] * stride_pn + offs_w[None, :],
                    mask=n_mask[:, None] & (offs_w[None, :] < K // 8), other=0)
        s = tl.load(S + e * stride_se + offs_n[:, None] * stride_sn + offs_g[None, :],
                    mask=n_mask[:, None] & (offs_g[None, :] < K // GROUP), other=0.0)
        shifts = tl.arange(0, 8) * 4
        q = ((p[:, :, None] >> shifts[None, None, :]) & 0xF) - 8  # [BLOCK_N, BLOCK_K / 8, 8]: column 8w + j
        w = tl.reshape(q, (BLOCK_N, BLOCK_K // GROUP, GROUP)).to(tl.float32) * s.to(tl.float32)[:, :, None]
        return tl.reshape(w, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _word_dot(P, S, X, e, m, offs_n, n_mask, k0, K, stride_xm, stride_pe, stride_pn, stride_se, stride_sn,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Expert e's rows offs_n times x[m, k0:k0+BLOCK_K], from the packed words [BLOCK_N, BLOCK_K/8] as they
        are: sum_w scale_w * sum_j q_wj * x[8w + j] (fp32)."""
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        w_mask = offs_w < K // 8
        p = tl.load(P + e * stride_pe + offs_n[:, None] * stride_pn + offs_w[None, :],
                    mask=n_mask[:, None] & w_mask[None, :], other=0)
        s = tl.load(S + e * stride_se + offs_n[:, None] * stride_sn + (offs_w // (GROUP // 8))[None, :],
                    mask=n_mask[:, None] & w_mask[None, :], other=0.0)
        acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        for j in tl.static_range(8):
            x = tl.load(X + m * stride_xm + offs_w * 8 + j, mask=w_mask, other=0.0).to(tl.float32)
            q = (((p >> (4 * j)) & 0xF) - 8).to(tl.float32)
            acc += q * x[None, :]
        return tl.sum(acc * s.to(tl.float32), axis=1)

    @triton.autotune(configs=_gemv_configs(), key=["M", "N", "K", "SWIGLU"],
                     prune_configs_by={"early_config_prune": _gemv_prune})
    @triton.jit
    def _w4a16_gemv_kernel(X, RowExpert, P1, S1, P2, S2, Y, M, N, K, stride_xm, stride_pe, stride_pn, stride_se,
                           stride_sn, stride_ym, GROUP: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, WORDS: tl.constexpr):
        m = tl.program_id(0)  # one token-expert row (M of them: the autotuning key's batch size)
        e = tl.load(RowExpert + m).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        # each tile is reduced as it arrives: [BLOCK_N] accumulators leave the registers to the loads in flight
        acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if WORDS:
                acc1 += _word_dot(P1, S1, X, e, m, offs_n, n_mask, k0, K, stride_xm, stride_pe, stride_pn, stride_se,
                                  stride_sn, GROUP, BLOCK_N, BLOCK_K)
                if SWIGLU:
                    acc2 += _word_dot(P2, S2, X, e, m, offs_n, n_mask, k0, K, stride_xm, stride_pe, stride_pn,
                                      stride_se, stride_sn, GROUP, BLOCK_N, BLOCK_K)
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(X + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                w1 = _dequant_tile(P1, S1, e, offs_n, n_mask, k0, K, stride_pe, stride_pn, stride_se, stride_sn,
                                   GROUP, BLOCK_N, BLOCK_K)
                acc1 += tl.sum(w1 * x[None, :], axis=1)
                if SWIGLU:
                    w2 = _dequant_tile(P2, S2, e, offs_n, n_mask, k0, K, stride_pe, stride_pn, stride_se, stride_sn,
                                       GROUP, BLOCK_N, BLOCK_K)
                    acc2 += tl.sum(w2 * x[None, :], axis=1)
        if SWIGLU:
            acc1 = acc1 / (1.0 + tl.exp(-acc1)) * acc2
        tl.store(Y + m * stride_ym + offs_n, acc1.to(Y.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _w4a16_grouped_gemm_kernel(X, BlockExpert, BlockRow, BlockEnd, P1, S1, P2, S2, Y, N, K, stride_xm,
                                   stride_pe, stride_pn, stride_se, stride_sn, stride_ym, GROUP: tl.constexpr,
                                   SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        e = tl.load(BlockExpert + pid_m)
        if e < 0:
            return  # spare program: the grid is an upper bound on the row blocks
        e = e.to(tl.int64)
        offs_m = tl.load(BlockRow + pid_m) + tl.arange(0, BLOCK_M)
        m_mask = offs_m < tl.load(BlockEnd + pid_m)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
            w1 = _dequant_tile(P1, S1, e, offs_n, n_mask, k0, K, stride_pe, stride_pn, stride_se, stride_sn,
                               GROUP, BLOCK_N, BLOCK_K).to(a.dtype)  # = the dequantized reference weight
            if IEEE:
                acc1 = tl.dot(a, tl.trans(w1), acc1, input_precision="ieee")
            else:
                acc1 = tl.dot(a, tl.trans(w1), acc1)
            if SWIGLU:
                w2 = _dequant_tile(P2, S2, e, offs_n, n_mask, k0, K, stride_pe, stride_pn, stride_se, stride_sn,
                                   GROUP, BLOCK_N, BLOCK_K).to(a.dtype)
                if IEEE:
                    acc2 = tl.dot(a, tl.trans(w2), acc2, input_precision="ieee")
                else:
                    acc2 = tl.dot(a, tl.trans(w2), acc2)
        if SWIGLU:
            acc1 = acc1 / (1.0 + tl.exp(-acc1)) * acc2
        tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc1.to(Y.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
