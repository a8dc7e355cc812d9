"""Native INT4 (W4A16) as K2 Thinking ships it: symmetric int4, one bf16 scale per 32 input columns, routed
experts only, stored in the compressed-tensors `pack-quantized` layout.

One rounding rule serves everything here, so the weights a QAT forward sees are exactly the weights the
INT4 checkpoint holds:
    scale = bf16(absmax(group) / 7.5)            (compressed-tensors' symmetric scale, rounded to bf16 once)
    q     = clamp(round_half_even(w / scale), -8, 7)   (w and scale in fp32)
    w'    = q * scale                            (exact in fp32; cast to the model dtype)
Packing: q + 8 -> nibble; eight consecutive input columns per int32, column 8g+j in bits 4j..4j+3.

QAT swaps the class of the targeted modules (the parameters stay the same objects, so optimizers and
checkpoints see nothing new) to one whose forward uses fake_quant(W) with a straight-through gradient.
PTQ (`quantize_model`) replaces each MoE's `experts` with an `Int4Experts` holding packed buffers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from moonlet.cli import at_least
from moonlet.config import ConfigError, ModelConfig
from moonlet.loss import head_cross_entropy
from moonlet.model import Experts

GROUP_SIZE = 32
NUM_BITS = 4
QMIN, QMAX = -8, 7
SCALE_DTYPE = torch.bfloat16  # K2's weight_scale dtype; scales are always rounded to it
PROJS = ("gate_proj", "up_proj", "down_proj")

# K2 Thinking's config.json ignore list: everything but the routed experts stays bf16.
K2_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]

# QAT targets are regexes searched in moonlet module names ("layers.3.mlp.experts", "layers.0.self_attn.o_proj")
# or one of these names. K2 (and the default) quantizes the routed experts only.
TARGET_ALIASES = {
    "experts": r"\.mlp\.experts$",
    "attention": r"\.self_attn\.\w+_proj\w*$",
    "shared_experts": r"\.shared_experts\.\w+_proj$",
    "dense_mlp": r"\.mlp\.(gate|up|down)_proj$",
    "lm_head": r"^lm_head$",
}
DEFAULT_TARGETS = ("experts",)


class QuantError(ValueError):
    """A quantization config, tensor or target that moonlet's INT4 path cannot handle."""


# ------------------------------------------------------------------------------------------------------
# the numerics: scale, quantize, dequantize, pack, fake-quant


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    if w.shape[-1] % group_size:
        raise QuantError(f"input dim {w.shape[-1]} of a {tuple(w.shape)} weight is not a multiple of the "
                         f"group size {group_size}")
    return w.float().unflatten(-1, (-1, group_size))


def compute_scale(w: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """Symmetric per-group scale [..., out, in/group] = bf16(absmax / 7.5) (compressed-tensors' rule: the
    largest magnitude lands on -8 or clamps to 7). Empty groups get the smallest normal bf16, not 0."""
    absmax = _groups(w.detach(), group_size).abs().amax(-1)
    scale = (absmax / ((QMAX - QMIN) / 2)).to(SCALE_DTYPE)
    return scale.clamp_min(torch.finfo(SCALE_DTYPE).tiny)


def quantize(w: torch.Tensor, scale: torch.Tensor | None = None,
             group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q int8 in [-8, 7] [..., out, in], scale bf16 [..., out, in/group])."""
    scale = compute_scale(w, group_size) if scale is None else scale
    q = torch.round(_groups(w.detach(), group_size) / scale.float().unsqueeze(-1)).clamp_(QMIN, QMAX)
    return q.flatten(-2).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q * scale, computed exactly in fp32 and rounded once to `dtype` (for bf16 this equals compressed-tensors'
    multiply in bf16: the product of a 4-bit integer and a bf16 scale rounds the same either way)."""
    group_size = q.shape[-1] // scale.shape[-1]
    w = q.float().unflatten(-1, (-1, group_size)) * scale.float().unsqueeze(-1)
    return w.flatten(-2).to(dtype)


_SHIFTS = torch.arange(0, 32, NUM_BITS, dtype=torch.int64)  # nibble j of a word sits in bits 4j..4j+3


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., n] in [-8, 7] -> int32 [..., n/8]: value + 8 as a nibble, column 8g+j in bits 4j..4j+3."""
    if q.shape[-1] % 8:
        raise QuantError(f"cannot pack {q.shape[-1]} columns: need a multiple of 8")
    u = (q.to(torch.int64) + 8).unflatten(-1, (-1, 8))
    word = (u << _SHIFTS.to(q.device)).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # reinterpret as signed int32


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n/8] -> int8 [..., n] in [-8, 7] (inverse of `pack`). On a little-endian machine byte b of a
    word holds columns 2b (low nibble) and 2b+1 (high), so the words are read as bytes: byte ops instead of
    int64 shifts, 3-5x faster (a 1408 x 2048 expert on one CPU thread: ~13 -> ~3 ms)."""
    if sys.byteorder == "little":
        b = packed.contiguous().view(torch.uint8).view(torch.int8)
        return torch.stack([(b & 0xF) - 8, (b >> 4 & 0xF) - 8], -1).flatten(-2)
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return (nibbles - 8).to(torch.int8).flatten(-2)


class _FakeQuant(torch.autograd.Function):
    """Forward: dequantize(quantize(w)) in w's dtype. Backward: the straight-through estimator (identity),
    so the bf16/fp32 master weights keep learning below the int4 resolution."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, group_size: int) -> torch.Tensor:
        return dequantize(*quantize(w, group_size=group_size), dtype=w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quant(w: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """The int4 weight the checkpoint will hold, as a float tensor; gradients pass straight through."""
    return _FakeQuant.apply(w, group_size)


# ------------------------------------------------------------------------------------------------------
# the compressed-tensors config


def quantization_config(group_size: int = GROUP_SIZE, ignore: list[str] | None = None) -> dict:
    """config.json `quantization_config` in K2 Thinking's form (compressed-tensors, pack-quantized)."""
    weights = {"num_bits": NUM_BITS, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": group_size, "dynamic": False, "actorder": None, "block_structure": None,
               "observer": "minmax", "observer_kwargs": {}}
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None}},
        "format": "pack-quantized",
        "ignore": list(K2_IGNORE if ignore is None else ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def group_size_of(qcfg: dict) -> int:
    """Read and check a config.json quantization_config: moonlet runs compressed-tensors pack-quantized
    symmetric int4 with group strategy, whatever the group size."""
    where = "config.json quantization_config"
    if qcfg.get("quant_method") != "compressed-tensors":
        raise QuantError(f"{where}.quant_method is {qcfg.get('quant_method')!r}; moonlet reads 'compressed-tensors'")
    groups = qcfg.get("config_groups") or {}
    if len(groups) != 1:
        raise QuantError(f"{where}.config_groups has {len(groups)} groups; moonlet supports exactly one")
    (name, group), = groups.items()
    w = group.get("weights") or {}
    fmt = group.get("format") or qcfg.get("format")
    for key, want in (("num_bits", NUM_BITS), ("type", "int"), ("symmetric", True), ("strategy", "group")):
        if w.get(key) != want:
            raise QuantError(f"{where}.config_groups.{name}.weights.{key} is {w.get(key)!r}; moonlet supports {want!r}")
    if fmt != "pack-quantized":
        raise QuantError(f"{where}.format is {fmt!r}; moonlet reads 'pack-quantized'")
    if group.get("input_activations"):
        raise QuantError(f"{where}.config_groups.{name}.input_activations is set; moonlet runs weight-only (W4A16)")
    gs = w.get("group_size")
    if not isinstance(gs, int) or gs <= 0 or gs % 8:
        raise QuantError(f"{where}.config_groups.{name}.weights.group_size is {gs!r}; need a positive multiple of 8")
    return gs


# ------------------------------------------------------------------------------------------------------
# FP8 block storage (DeepSeek-V3 and the Kimi K2 base / instruct releases): read, held dense


def fp8_block_size(qcfg: dict) -> tuple[int, int]:
    """Check a config.json quantization_config of DeepSeek's FP8 format ({"quant_method": "fp8", "fmt": "e4m3",
    "weight_block_size": [128, 128]}): e4m3 weights with one float32 `weight_scale_inv` per block."""
    where = "config.json quantization_config"
    if qcfg.get("fmt", "e4m3") != "e4m3":
        raise QuantError(f"{where}.fmt is {qcfg.get('fmt')!r}; moonlet reads FP8 'e4m3' (float8_e4m3fn) weights")
    block = qcfg.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise QuantError(f"{where}.weight_block_size is {block!r}; need [rows, columns] per scale, e.g. [128, 128]")
    return block[0], block[1]


def is_fp8(qcfg: dict | None) -> bool:
    return bool(qcfg) and qcfg.get("quant_method") == "fp8"


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float8 w [N, K] times its block's scale_inv [ceil(N/b0), ceil(K/b1)] -> float32 [N, K]."""
    if w.dim() != 2:
        raise QuantError(f"FP8 block scales are defined for 2-D weights; this one is {tuple(w.shape)}")
    N, K = w.shape
    rows, cols = -(-N // block[0]), -(-K // block[1])
    if tuple(scale_inv.shape) != (rows, cols):
        raise QuantError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {N} x {K} weight in {block[0]} x "
                         f"{block[1]} blocks needs {(rows, cols)}")
    s = scale_inv.float().repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)[:, :K]
    return w.float() * s


# ------------------------------------------------------------------------------------------------------
# INT4 routed experts (packed in memory)


class Int4Experts(Experts):
    """Routed experts held packed: `{proj}_packed` int32 [E, out, in/8] and `{proj}_scale` [E, out, in/group]
    (buffers: not trained). Routing and token sorting are Experts'; only the grouped matmul differs."""

    def __init__(self, cfg: ModelConfig, group_size: int = GROUP_SIZE, scale_dtype: torch.dtype = SCALE_DTYPE):
        nn.Module.__init__(self)
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts, self.group_size = E, group_size
        self._shapes = {"gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}
        for proj, (out, inp) in self._shapes.items():
            if inp % group_size:
                raise QuantError(f"{proj} input dim {inp} is not a multiple of the int4 group size {group_size}")
            self.register_buffer(f"{proj}_packed", torch.empty(E, out, inp // 8, dtype=torch.int32))
            self.register_buffer(f"{proj}_scale", torch.empty(E, out, inp // group_size, dtype=scale_dtype))

    def _cpu_int4pack(self):
        """-> weights(proj, e): expert e's weight in the layout of torch's CPU int4 kernel, converted at its
        first use and kept (another 0.5 byte per weight of the experts used). Checked once per forward: kept
        copies are dropped when the buffers they came from were replaced or written in place (a load)."""
        from moonlet.kernels.w4a16 import cpu_int4pack

        cache = self.__dict__.setdefault("_cpu_copies", {})
        kept = {}
        for proj in PROJS:
            packed, scale = getattr(self, f"{proj}_packed"), getattr(self, f"{proj}_scale")
            entry = cache.get(proj)
            if entry is None or entry[0]() is not packed or entry[1]() is not scale or \
                    entry[2] != (packed._version, scale._version):
                entry = cache[proj] = (weakref.ref(packed), weakref.ref(scale), (packed._version, scale._version), {})
            kept[proj] = (packed, scale, entry[3])

        def weights(proj: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
            packed, scale, copies = kept[proj]
            if e not in copies:
                copies[e] = cpu_int4pack(packed[e], scale[e])
            return copies[e]
        return weights

    def chosen(self, proj: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weights of experts `ids`, dequantized in one op: [len(ids), out, in]."""
        return dequantize(unpack(getattr(self, f"{proj}_packed")[ids]), getattr(self, f"{proj}_scale")[ids], dtype)

    def expert_numel(self) -> int:
        out, inp = self._shapes["gate_proj"]
        return out * inp

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_cpu_copies", None)  # .to() / .cuda() / .half(): the copies belong to the old buffers
        return super()._apply(fn, recurse)

    def unpacked_shape(self, proj: str) -> list[int]:
        """[out, in] of one expert's weight, as compressed-tensors' `weight_shape`."""
        return list(self._shapes[proj])

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts, cfg: ModelConfig, group_size: int = GROUP_SIZE) -> Int4Experts:
        """Round-to-nearest PTQ of dense stacked experts (one expert at a time to bound peak memory)."""
        dev = experts.gate_proj.device
        with torch.device(dev):
            new = cls(cfg, group_size)
        for proj in PROJS:
            w = getattr(experts, proj)
            for e in range(w.shape[0]):
                q, scale = quantize(w[e], group_size=group_size)
                getattr(new, f"{proj}_packed")[e] = pack(q)
                getattr(new, f"{proj}_scale")[e] = scale
        return new

    def dequantized(self, proj: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """One stacked weight [E, out, in] in `dtype` (references and tests; the forward never builds it)."""
        return dequantize(unpack(getattr(self, f"{proj}_packed")), getattr(self, f"{proj}_scale"), dtype)

    def grouped_swiglu(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from moonlet.kernels import w4a16

        if w4a16.use_cpu_int4pack(xs, [s[0] for s in self._shapes.values()], self.group_size):
            return w4a16.cpu_int4pack_swiglu(xs, counts, self._cpu_int4pack(), self.group_size)
        return w4a16.w4a16_grouped_swiglu(xs, counts, self.gate_proj_packed, self.gate_proj_scale, self.up_proj_packed,
                                    self.up_proj_scale, self.down_proj_packed, self.down_proj_scale)


def replace_experts_for_checkpoint(model: nn.Module, qcfg: dict, layers: set[int] | None = None) -> None:
    """Called by checkpoint.build on the meta model when config.json has a quantization_config: the MoE
    layers whose experts are packed on disk (`layers`; None: all) get Int4Experts, so the loader fills packed
    tensors and no bf16 copy of the experts ever exists."""
    group_size = group_size_of(qcfg)
    for i, block in enumerate(model.layers):
        moe = block.mlp
        if not hasattr(moe, "experts") or (layers is not None and i not in layers):
            continue
        with torch.device(moe.gate.weight.device):
            moe.experts = Int4Experts(model.cfg, group_size)


@torch.no_grad()
def quantize_model(model: nn.Module, group_size: int = GROUP_SIZE, progress: bool = False) -> nn.Module:
    """RTN PTQ in memory, K2's way: each MoE's routed experts become packed Int4Experts (the dense copy is
    freed), everything else stays as it is. Also records the quantization_config in model.cfg so that
    `moonlet.save` writes K2's config. Idempotent."""
    layers = model.moe_layers()
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="quantize experts", unit="layer")
    for moe in layers:
        if not isinstance(moe.experts, Int4Experts):
            moe.experts = Int4Experts.from_experts(moe.experts, model.cfg, group_size)
    model.cfg.extra["quantization_config"] = quantization_config(group_size)
    return model


@torch.no_grad()
def quantize_checkpoint(src: str | Path, out: str | Path, group_size: int = GROUP_SIZE,
                        dtype: torch.dtype = torch.bfloat16, max_shard_size: int | str = "5GB",
                        progress: bool = False) -> dict | None:
    """RTN INT4 of a checkpoint's routed experts straight from disk to disk, one tensor at a time: memory holds
    one tensor and one output shard, so a 1T-parameter checkpoint quantizes on a machine that could never
    load it. The files equal quantize_model + save on the loaded model (tested), and are checked first
    against the names and shapes a model of the config has. Returns a summary, or None when the experts are
    not stored one tensor per expert (a layout only the loader reads: quantize the loaded model instead)."""
    from moonlet import checkpoint as ck

    src = Path(src)
    cfg = ModelConfig.from_hf(src)
    reader = ck.DiskReader(src, ck.stored_fp8(cfg))  # an FP8 source is dequantized tensor by tensor
    if cfg.quantization_config:
        raise QuantError(f"{src} is already quantized ({cfg.quantization_config.get('format')})")
    qcfg = copy.deepcopy(cfg)
    qcfg.extra["quantization_config"] = quantization_config(group_size)
    want = {name: (tuple(t.shape), t.dtype) for name, t in ck.disk_tensors(ck.build(qcfg, "meta", dtype))}
    plan: dict[Path, list[tuple[str, list[str]]]] = {}  # file -> (disk name, the names it is written as)
    for file in ck._shard_files(src):
        with ck.open_shard(file) as f:
            for disk in f.keys():
                if ck._FUSED_EXPERT.match(disk):
                    return None
                if ck.not_loaded(disk, cfg):
                    continue  # not written either
                m = ck._EXPERT.match(disk)
                base = disk.removesuffix(".weight")
                names = [f"{base}.{k}" for k in ("weight_packed", "weight_scale", "weight_shape")] \
                    if m and m.group(4) == "weight" else [disk]
                for name in names:
                    if name not in want:
                        raise QuantError(f"{file.name}: tensor {disk!r} is not part of a model of this config.json")
                shape = tuple(f.get_slice(disk).get_shape())
                packed = want[names[0]][0]
                if shape != (packed if len(names) == 1 else (packed[0], packed[1] * 8)):
                    raise QuantError(f"{file.name}: tensor {disk!r} has shape {shape}, which a model of this "
                                     f"config.json does not have")
                plan.setdefault(file, []).append((disk, names))
    planned = {n for items in plan.values() for _, names in items for n in names}
    missing = [n for n in want if n not in planned and not ck.keeps_fp32(n)]
    if missing:
        raise QuantError(f"{src}: {len(missing)} tensors are missing, e.g. {missing[:3]}")
    writer = ck.ShardWriter(out, max_shard_size)
    n_experts = sum(len(names) == 3 for items in plan.values() for _, names in items)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(map(len, plan.values())), desc="quantize", unit="tensor")
    for file, items in plan.items():
        with ck.open_shard(file) as f:
            for disk, names in items:
                t = reader.get(f, file, disk)
                if len(names) == 3:
                    q, scale = quantize(t.float(), group_size=group_size)
                    for name, v in zip(names, (pack(q), scale, torch.tensor(t.shape, dtype=torch.int64))):
                        writer.add(name, v)
                else:
                    writer.add(disk, t.float() if ck.keeps_fp32(disk) else t.to(dtype) if t.is_floating_point()
                               else t)
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    for name in want:  # a bias the source did not have: zero, as the loader gives
        if name not in planned:
            writer.add(name, torch.zeros(want[name][0], dtype=torch.float32))
    writer.close(ck.config_for_disk(qcfg, dtype))
    return {"moe_layers": cfg.n_moe_layers, "quantized_tensors": n_experts}


# ------------------------------------------------------------------------------------------------------
# QAT


class QATExperts(Experts):
    """Experts whose forward uses fake-quantized weights (same parameters, same state_dict)."""

    qat_group_size = GROUP_SIZE

    def grouped_swiglu(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w = SimpleNamespace(**{p: fake_quant(getattr(self, p), self.qat_group_size) for p in PROJS})
        return Experts.grouped_swiglu(w, xs, counts)  # the dense grouped compute, on the fake-quant weights

    def chosen(self, proj: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return fake_quant(getattr(self, proj)[ids], self.qat_group_size).to(dtype)


class QATLinear(nn.Linear):
    qat_group_size = GROUP_SIZE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant(self.weight, self.qat_group_size), self.bias)


_QAT_CLASS = {Experts: QATExperts, nn.Linear: QATLinear}


def _target_regexes(targets) -> list[re.Pattern]:
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise QuantError("QAT targets are empty; use e.g. ['experts'] (K2's choice)")
    return [re.compile(TARGET_ALIASES.get(t, t)) for t in targets]


def enable_qat(model: nn.Module, targets=DEFAULT_TARGETS, group_size: int = GROUP_SIZE) -> list[str]:
    """Fake-quantize the targeted weights in every forward from now on (int4 group `group_size`, STE);
    master weights and their names are unchanged. Targets: names in TARGET_ALIASES ('experts' = K2's
    routed experts) or regexes searched in module names. Returns the names of the modules it changed."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    regexes = _target_regexes(targets)
    done = []
    for name, mod in model.named_modules():
        if not any(r.search(name) for r in regexes):
            continue
        base = type(mod)
        if base in _QAT_CLASS.values():
            mod.qat_group_size = group_size
            done.append(name)
        elif base in _QAT_CLASS:
            weight = mod.weight if base is nn.Linear else mod.gate_proj
            if weight.shape[-1] % group_size:
                raise QuantError(f"QAT target {name}: input dim {weight.shape[-1]} is not a multiple of group "
                                 f"size {group_size}")
            mod.__class__ = _QAT_CLASS[base]
            mod.qat_group_size = group_size
            done.append(name)
    if not done:
        raise QuantError(f"QAT targets {targets} matched no Linear or Experts module of the model "
                         f"(aliases: {', '.join(TARGET_ALIASES)}; or a regex over names like 'layers.1.mlp.experts')")
    return done


def disable_qat(model: nn.Module) -> None:
    """Back to plain forwards (the weights were never modified)."""
    plain = {v: k for k, v in _QAT_CLASS.items()}
    for mod in model.modules():
        if type(mod) in plain:
            mod.__class__ = plain[type(mod)]


# ------------------------------------------------------------------------------------------------------
# `moonlet quantize IN_DIR OUT_DIR`


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@torch.no_grad()
def eval_loss(model: nn.Module, data_dir: str | Path, seq_len: int = 256, batches: int = 16, batch: int = 8) -> float:
    """Mean next-token loss on the first batches x batch windows of a `moonlet data` val split (in order)."""
    from moonlet.data import PackedData

    data = PackedData(data_dir, seq_len, "val", shuffle=False)
    total, count = 0.0, 0
    for b in range(min(batches, data.n_windows // batch)):
        x, y, mask = data.batch(b * batch, batch)
        total += float(head_cross_entropy(model, model(x, head=False), y, mask)[0])
        count += int(mask.sum())
    if not count:
        raise QuantError(f"{data_dir}: val split has fewer than {batch} windows of {seq_len} tokens")
    return total / count


def _shard_size(text: str) -> int:
    """argparse type for --max-shard-size: checked before OUT_DIR is created."""
    from moonlet.checkpoint import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cli_quantize(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moonlet quantize",
        description="Round-to-nearest INT4 (W4A16) of a checkpoint's routed experts, written in K2 Thinking's "
                    "compressed-tensors pack-quantized format (symmetric int4, bf16 scale per group of 32 input "
                    "columns; attention, shared experts, dense MLPs, router, embeddings and head stay in --dtype). "
                    "For a model trained with `moonlet train --qat int4` this is lossless: the checkpoint holds "
                    "exactly the weights the QAT forward used. Tensors go from disk to disk one at a time (memory: "
                    "one tensor and one output shard), so checkpoints far larger than RAM quantize too. IN_DIR may be "
                    "bf16/fp32 or DeepSeek's FP8 block format (DeepSeek-V3, Kimi K2 base / instruct), which is "
                    "dequantized first.")
    p.add_argument("in_dir", help="HF-format checkpoint directory (config.json + *.safetensors), or a "
                   "`moonlet train` run directory (its newest checkpoint)")
    p.add_argument("out_dir", help="where to write the INT4 checkpoint (created; other files of IN_DIR are copied)")
    p.add_argument("--group-size", type=int, default=GROUP_SIZE, help="input columns per scale (K2: 32)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the tensors that stay unquantized (K2: bfloat16)")
    p.add_argument("--max-shard-size", type=_shard_size, default="5GB",
                   help="safetensors shard size limit, e.g. 5GB or 500MB")
    p.add_argument("--eval-data", default=None, help="a `moonlet data prepare` directory: also report the val "
                   "loss before and after quantization (eval_loss_in / eval_loss_out)")
    p.add_argument("--eval-seq-len", type=at_least(1), default=256, help="eval window length (default: %(default)s)")
    p.add_argument("--eval-batches", type=at_least(1), default=16,
                   help="eval batches of 8 windows (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")
    a = p.parse_args(argv)
    if a.group_size <= 0 or a.group_size % 8:
        p.error(f"--group-size {a.group_size}: need a positive multiple of 8 (K2: 32)")
    from moonlet.checkpoint import CheckpointError, load, model_dir, save

    src, out = Path(a.in_dir), Path(a.out_dir)
    newest = Path(model_dir(src)) if src.is_dir() else src  # a training run: its newest complete checkpoint
    if newest != src:
        print(f"moonlet quantize: {src} is a training run; quantizing its newest checkpoint {newest}", file=sys.stderr)
        src = newest
    if not (src / "config.json").exists():
        print(f"moonlet quantize: {src}/config.json not found: IN_DIR must be an HF-format checkpoint", file=sys.stderr)
        return 2
    if out.resolve() == src.resolve():
        print("moonlet quantize: OUT_DIR must differ from IN_DIR (the source is read while writing)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    dtype = getattr(torch, a.dtype)
    try:
        qc = ModelConfig.from_hf(src).quantization_config
        if qc and not is_fp8(qc):
            print(f"moonlet quantize: {src} is already quantized ({qc.get('format')})", file=sys.stderr)
            return 2
        losses = {}
        if a.eval_data:  # (loads the whole source model: only for models that fit in memory)
            losses["eval_loss_in"] = eval_loss(load(src, dtype=torch.float32), a.eval_data, a.eval_seq_len,
                                               a.eval_batches)
        done = quantize_checkpoint(src, out, a.group_size, dtype, a.max_shard_size, progress=not a.json)
        if done is None:  # experts stored in a layout only the loader reads: quantize the loaded model
            model = quantize_model(load(src, dtype=torch.float32), a.group_size, progress=not a.json)
            save(model, out, max_shard_size=a.max_shard_size, dtype=dtype)
            done = {"moe_layers": len(model.moe_layers()),
                    "quantized_tensors": 3 * len(model.moe_layers()) * model.cfg.n_routed_experts}
        if a.eval_data:
            int4 = load(out, dtype=torch.float32)  # what was written, as it will be served
            losses["eval_loss_out"] = eval_loss(int4, a.eval_data, a.eval_seq_len, a.eval_batches)
    except (CheckpointError, QuantError, ConfigError) as e:
        print(f"moonlet quantize: {e}", file=sys.stderr)
        return 1
    skip = {"config.json", "model.safetensors.index.json"}
    for f in src.iterdir():  # tokenizer and the like; not weights or optimizer state. Replaced, never kept: an
        # OUT_DIR quantized from another model before must not keep that model's tokenizer
        if f.is_file() and f.suffix not in (".safetensors", ".pt", ".bin") and f.name not in skip:
            shutil.copy2(f, out / f"{f.name}.tmp")
            os.replace(out / f"{f.name}.tmp", out / f.name)
    summary = {"in_dir": str(src), "out_dir": str(out), "group_size": a.group_size, **done, "in_bytes": _dir_bytes(src),
               "out_bytes": _dir_bytes(out), **losses, "seconds": round(time.perf_counter() - t0, 2)}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {out}: {summary['quantized_tensors']} expert weights int4 g{a.group_size}, "
              f"{summary['in_bytes'] / 1e6:.1f} MB -> {summary['out_bytes'] / 1e6:.1f} MB in {summary['seconds']} s"
              + (f"; val loss {losses['eval_loss_in']:.4f} -> {losses['eval_loss_out']:.4f}" if losses else ""))
    return 0
