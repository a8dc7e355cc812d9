"""Every Triton launch configuration moonlet uses, compiled ahead of time for an NVIDIA architecture (default
sm_90: H100/H200) with Triton's own ptxas, on any machine, no GPU needed. Triton's CPU interpreter runs the
same kernels but accepts code that real hardware rejects, and cannot show register spills, which would cost a
memory-bound decode kernel its bandwidth. So a CPU-only developer (and CI) can still see what the GPU will get:

    python -m moonlet.kernels.aot            # one JSON line per configuration: registers, stack (spills), shared
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from moonlet.kernels import HAS_TRITON, max_logits, triton, w4a16

W4A16_POINTERS = {"X": "*bf16", "S1": "*bf16", "S2": "*bf16", "Y": "*bf16", "RowExpert": "*i32", "P1": "*i32",
                  "P2": "*i32", "BlockExpert": "*i32", "BlockRow": "*i32", "BlockEnd": "*i32"}
MAX_LOGITS_POINTERS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "out_ptr": "*fp32"}


def launch_configs() -> list[tuple[str, object, dict, int, dict]]:
    """(name, kernel, constexprs, num_warps, pointer types) for each configuration a bf16 model launches."""
    out = []
    for swiglu in (True, False):
        for n, k, warps, words in w4a16.GEMV_TILES:
            out.append(("w4a16_gemv", w4a16._w4a16_gemv_kernel.fn, dict(GROUP=32, SWIGLU=swiglu, BLOCK_N=n, BLOCK_K=k,
                                                                       WORDS=words), warps, W4A16_POINTERS))
        for m, n, k, warps in w4a16.GEMM_TILES.values():
            out.append(("w4a16_grouped_gemm", w4a16._w4a16_grouped_gemm_kernel,
                        dict(GROUP=32, SWIGLU=swiglu, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, IEEE=False), warps, W4A16_POINTERS))
    for head_dim in (96, 192):  # moe-2b's q/k head; K2's, DeepSeek-V3's and Moonlight's
        block_d = max(16, triton.next_power_of_2(head_dim))
        out.append(("causal_max_logits", max_logits._causal_max_kernel,
                    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, IEEE=False), 4, MAX_LOGITS_POINTERS))
    return out


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def nvidia_backend() -> bool:
    """Triton is installed with its NVIDIA backend (ptxas, cuobjdump)."""
    return HAS_TRITON and os.path.exists(_cuobjdump())


def available() -> bool:
    """The NVIDIA backend, and not the interpreter (whose kernels cannot be compiled)."""
    return nvidia_backend() and os.environ.get("TRITON_INTERPRET") != "1"


def compile_report(kernel, constexprs: dict, num_warps: int, pointers: dict[str, str], arch: int = 90) -> dict:
    """Compile one configuration to machine code (Triton runs its ptxas): registers per thread, stack and local
    bytes per thread (where spilled registers go), shared memory per program, as cuobjdump reads the cubin."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, "i32") for p in kernel.params}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    field = lambda name: int(re.search(rf"\b{name}:(\d+)", usage).group(1))
    return {"registers": field("REG"), "stack_bytes": field("STACK"), "local_bytes": field("LOCAL"),
            "shared_bytes": compiled.metadata.shared}  # Triton's smem is dynamic: cuobjdump sees only the static


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moonlet.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default: 90, Hopper)")
    args = ap.parse_args(argv)
    if not available():
        print("moonlet.kernels.aot: needs Triton with its NVIDIA backend, and TRITON_INTERPRET unset",
              file=sys.stderr)
        return 2
    for name, kernel, consts, warps, pointers in launch_configs():
        row = {"kernel": name, **consts, "num_warps": warps, "arch": args.arch}
        print(json.dumps(row | compile_report(kernel, consts, warps, pointers, args.arch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
