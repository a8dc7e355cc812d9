"""W4A16 grouped MoE matmul: every path equals the dense computation on the dequantized weights.

CPU runs the torch fallback and the device-side block planning. The Triton kernels run on CUDA (bf16), or
on CPU through Triton's interpreter (fp32/fp16; its bf16 tl.dot is broken) with:
    TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py -k triton
"""

import os

import pytest
import torch
import torch.nn.functional as F

from moonlet import quant
from moonlet.kernels import aot, w4a16
from moonlet.model import Experts

CUDA = torch.cuda.is_available()


def packed_experts(E=6, D=128, I=96, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for proj, shape in (("gate_proj", (E, I, D)), ("up_proj", (E, I, D)), ("down_proj", (E, D, I))):
        q, s = quant.quantize(torch.randn(shape, generator=g) * 0.05)
        out[proj] = (quant.pack(q).to(device), s.to(device))
    return out


def dense_reference(xs, counts, experts, dtype):
    """Experts.grouped_swiglu (the bf16 model's own compute) on the dequantized weights."""
    w = {p: quant.dequantize(quant.unpack(pk), s, dtype) for p, (pk, s) in experts.items()}
    return Experts.grouped_swiglu(type("W", (), w), xs, counts)


def args(experts, dtype):
    return [t for p in quant.PROJS for t in (experts[p][0], experts[p][1].to(dtype))]


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 2], [0, 0, 0, 0, 0, 4], [0] * 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_fallback_equals_dense_dequantized_reference(counts, dtype):
    experts = packed_experts()
    counts = torch.tensor(counts)
    xs = torch.randn(int(counts.sum()), 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = w4a16.w4a16_grouped_swiglu(xs, counts, *args(experts, dtype))
    ref = dense_reference(xs, counts, experts, dtype)
    assert out.shape == (xs.shape[0], 128) and out.dtype == dtype
    assert torch.equal(out, ref)


def test_grouped_matmul_fallback_applies_each_experts_weight_to_its_rows():
    experts = packed_experts()
    pk, s = experts["down_proj"]
    counts = torch.tensor([2, 0, 1, 0, 0, 3])
    xs = torch.randn(6, 96)
    out = w4a16.w4a16_grouped_matmul(xs, counts, pk, s)
    w = quant.dequantize(quant.unpack(pk), s, torch.float32)
    ref = torch.cat([xs[:2] @ w[0].T, xs[2:3] @ w[2].T, xs[3:] @ w[5].T])
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("counts,block_m", [([3, 0, 40, 1, 16, 0, 17], 16), ([0, 0, 5], 64), ([33], 16), ([0, 0], 16)])
def test_block_table_gives_each_row_to_exactly_one_program_of_its_expert(counts, block_m):
    counts = torch.tensor(counts)
    M = int(counts.sum())
    expert, row, end, n_prog = w4a16._block_table(counts, M, block_m)
    assert expert.shape == (n_prog,)
    owner = torch.full((M,), -1)
    for b in range(n_prog):
        if expert[b] < 0:
            continue
        rows = torch.arange(int(row[b]), min(int(row[b]) + block_m, int(end[b])))
        assert (owner[rows] == -1).all()
        owner[rows] = expert[b].long()
    assert torch.equal(owner, torch.repeat_interleave(torch.arange(len(counts)), counts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_model_forward_equals_dense_model_on_dequantized_weights(dtype):
    """fp32: the fallback, bit for bit. bf16 on the CPU: torch's int4 kernel, equal up to bf16 rounding (it
    sums in another order than the dense matmul)."""
    from moonlet.checkpoint import build
    from moonlet.config import ModelConfig

    model = build(ModelConfig.from_preset("tiny"), dtype=dtype)
    model.init_weights(seed=0)
    ids = torch.randint(0, 32000, (2, 9), generator=torch.Generator().manual_seed(0))
    quant.enable_qat(model)  # the dense forward on fake-quant (= dequantized) weights
    with torch.no_grad():
        ref = model(ids)
        out = quant.quantize_model(model)(ids)
    if dtype == torch.float32:
        assert torch.equal(out, ref)
    else:
        assert "_cpu_copies" in model.layers[1].mlp.experts.__dict__  # the int4 kernel ran
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------------------
# CPU: torch's int4 kernel (bf16 activations)


@pytest.mark.parametrize("out_dim,in_dim,group", [(96, 128, 32), (128, 96, 32), (64, 256, 64), (16, 128, 128)])
def test_cpu_int4_layout_holds_exactly_the_dequantized_weight(out_dim, in_dim, group):
    """The identity times the converted weight reads it back: each output is one product q * scale, rounded
    once to bf16, the same rounding as dequantize(..., bf16)."""
    q, s = quant.quantize(torch.randn(out_dim, in_dim, generator=torch.Generator().manual_seed(3)), group_size=group)
    w, sz = w4a16.cpu_int4pack(quant.pack(q), s)
    eye = torch.eye(in_dim, dtype=torch.bfloat16)
    read = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, w, group, sz)
    assert torch.equal(read.t(), quant.dequantize(q, s, torch.bfloat16))


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 2], [0, 0, 0, 0, 0, 4], [0] * 6])
def test_cpu_int4_kernel_swiglu_matches_the_dense_bf16_reference(counts):
    experts = packed_experts()
    counts = torch.tensor(counts)
    xs = torch.randn(int(counts.sum()), 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert w4a16.use_cpu_int4pack(xs, [96, 128], 32)
    copies = {p: [w4a16.cpu_int4pack(experts[p][0][e], experts[p][1][e]) for e in range(6)] for p in quant.PROJS}
    out = w4a16.cpu_int4pack_swiglu(xs, counts, lambda p, e: copies[p][e], 32)
    ref = dense_reference(xs, counts, experts, torch.bfloat16)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_int4_experts_drop_their_cpu_copies_when_the_weights_change():
    from moonlet.config import ModelConfig

    cfg = ModelConfig.from_preset("tiny")
    experts = [quant.Int4Experts(cfg) for _ in range(2)]
    for seed, ex in enumerate(experts):
        for proj, (pk, s) in packed_experts(E=cfg.n_routed_experts, D=cfg.hidden_size, I=cfg.moe_intermediate_size,
                                            seed=seed).items():
            getattr(ex, f"{proj}_packed").copy_(pk)
            getattr(ex, f"{proj}_scale").copy_(s)
    xs = torch.randn(4, cfg.hidden_size).bfloat16()
    counts = torch.tensor([1, 0, 2, 1] + [0] * (cfg.n_routed_experts - 4))
    first, second = (ex.grouped_swiglu(xs, counts) for ex in experts)
    assert not torch.equal(first, second)
    experts[0].load_state_dict(experts[1].state_dict())  # written in place: the kept copies are stale
    assert torch.equal(experts[0].grouped_swiglu(xs, counts), second)
    experts[0].to(torch.float32)
    assert "_cpu_copies" not in experts[0].__dict__


# ------------------------------------------------------------------------------------------------------
# Triton (CUDA, or the interpreter)


@pytest.mark.triton
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("counts", [[1, 0, 2, 0, 0, 1], [0, 0, 0, 0, 0, 3], [9, 0, 30, 2, 0, 25]])
def test_triton_kernels_match_dequantized_reference(path, counts, monkeypatch):
    dev = "cuda" if CUDA else "cpu"
    dtypes = [torch.bfloat16] if CUDA else [torch.float32, torch.float16]
    monkeypatch.setattr(w4a16, "DECODE_MAX_ROWS", 10**9 if path == "decode" else 0)
    experts = packed_experts(device=dev)
    counts = torch.tensor(counts, device=dev)
    for dtype in dtypes:
        xs = torch.randn(int(counts.sum()), 128, generator=torch.Generator().manual_seed(2)).to(dev, dtype)
        out = w4a16.triton_grouped_swiglu(xs, counts, *args(experts, dtype))
        ref = dense_reference(xs.float(), counts, experts, torch.float32)
        assert out.dtype == dtype
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert torch.allclose(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol), (dtype, path)


@pytest.mark.triton
@pytest.mark.parametrize("tile", w4a16.GEMV_TILES)
def test_every_triton_gemv_tile_the_autotuner_may_pick_matches_the_reference(tile):
    dev = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    experts = packed_experts(device=dev)
    counts = torch.tensor([1, 0, 2, 0, 0, 1], device=dev)
    xs = torch.randn(4, 128, generator=torch.Generator().manual_seed(2)).to(dev, dtype)
    out = w4a16.triton_grouped_swiglu(xs, counts, *args(experts, dtype), gemv_tile=tile)
    ref = dense_reference(xs.float(), counts, experts, torch.float32)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.triton
@pytest.mark.slow
def test_torch_compile_calls_the_triton_experts_as_one_opaque_op():
    """The compiled decode step (CUDA graphs of it) must not trace into autotuned Triton launches: the kernels
    sit behind the custom op moonlet::w4a16_swiglu, whose fake gives the output's shape."""
    dev = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    experts = packed_experts(device=dev)
    counts = torch.tensor([1, 0, 2, 0, 0, 1], device=dev)
    xs = torch.randn(4, 128, generator=torch.Generator().manual_seed(2)).to(dev, dtype)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(xs, counts, *weights):
        return torch.ops.moonlet.w4a16_swiglu(xs * 1.0, counts, *weights) + 1.0

    out = step(xs, counts, *args(experts, dtype)) - 1.0
    ref = dense_reference(xs.float(), counts, experts, torch.float32)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.skipif(not aot.nvidia_backend(), reason="needs Triton with its NVIDIA backend (ptxas, cuobjdump)")
def test_every_triton_launch_configuration_compiles_for_hopper_without_register_spills():
    """No GPU needed: Triton compiles for sm_90 and cuobjdump reads registers and stack (where spills go) off the
    machine code. A real subprocess,
    since kernels imported under TRITON_INTERPRET=1 (as the CPU tests run) cannot be compiled."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "moonlet.kernels.aot"], env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"w4a16_gemv", "w4a16_grouped_gemm", "causal_max_logits"}
    assert len([r for r in rows if r["kernel"] == "w4a16_gemv"]) == 2 * len(w4a16.GEMV_TILES)
    assert [r for r in rows if r["stack_bytes"] or r["local_bytes"]] == []
    assert all(0 < r["registers"] <= 255 for r in rows)


def nano_model_with_qat(dtype):
    from moonlet.checkpoint import build
    from moonlet.config import ModelConfig

    model = build(ModelConfig.from_preset("nano"), device="cuda", dtype=dtype)
    model.init_weights(seed=0)
    quant.enable_qat(model)
    return model


@pytest.mark.skipif(not (CUDA and w4a16.HAS_TRITON), reason="needs CUDA and Triton")
def test_int4_model_on_cuda_uses_triton_and_matches_the_fake_quant_model_in_fp32():
    """fp32 (the GEMM's IEEE dot): the packed model's logits are the QAT model's, prefill and decode shapes.
    (In bf16 a random model's sigmoid router sits on near-ties, so rounding alone can flip a token's experts;
    the bf16 kernels are compared expert by expert below.)"""
    model = nano_model_with_qat(torch.float32)
    ids = torch.randint(0, 32000, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        quant.quantize_model(model)
        assert isinstance(model.moe_layers()[0].experts, quant.Int4Experts)
        for T in (64, 1):  # prefill (grouped GEMM: 256 token-expert rows) and one-token decode (GEMV: 4 rows)
            out = model(ids[:, :T])
            err = ((out - ref[:, :T]).abs().max() / ref.abs().max()).item()
            assert err < 1e-3, (T, err)


@pytest.mark.skipif(not (CUDA and w4a16.HAS_TRITON), reason="needs CUDA and Triton")
@pytest.mark.parametrize("rows", [256, 4])  # the grouped GEMM and the GEMV
def test_int4_experts_on_cuda_in_bf16_match_the_fake_quant_experts_on_grouped_mm(rows):
    """bf16: each layer's packed experts (Triton) against its QAT experts (torch._grouped_mm on the
    fake-quantized weights), on the same sorted rows."""
    model = nano_model_with_qat(torch.bfloat16)
    gen = torch.Generator("cuda").manual_seed(1)
    E, D = model.cfg.n_routed_experts, model.cfg.hidden_size
    counts = torch.bincount(torch.randint(0, E, (rows,), device="cuda", generator=gen), minlength=E)
    xs = torch.randn(rows, D, device="cuda", generator=gen).bfloat16()
    with torch.no_grad():
        refs = [moe.experts.grouped_swiglu(xs, counts).float() for moe in model.moe_layers()]
        quant.quantize_model(model)
        for i, (moe, ref) in enumerate(zip(model.moe_layers(), refs)):
            out = moe.experts.grouped_swiglu(xs, counts).float()
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            assert err < 2e-2, (i, err)
            assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9999, i
