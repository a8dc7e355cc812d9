"""HF-layout checkpoints: config.json + safetensors (sharded with model.safetensors.index.json).

Tensor names on disk are the DeepSeek-V3 / K2 names (`model.layers.L.mlp.experts.E.gate_proj.weight`);
inside moonlet the routed experts are stacked [E, out, in], so each disk tensor is one slice of a stacked
parameter. Loading goes shard by shard straight into the preallocated model (never two copies in memory).

Quantized experts (compressed-tensors `pack-quantized`: `X.weight_packed`, `X.weight_scale`,
`X.weight_shape`) map onto tensors `X_packed` / `X_scale` of the INT4 experts module that moonlet.quant swaps
in when config.json carries a `quantization_config`; the rest of the loader is the same. DeepSeek's FP8 block
format (`X.weight` float8_e4m3fn + `X.weight_scale_inv` per 128 x 128 block: DeepSeek-V3 and the Kimi K2 base /
instruct releases) is dequantized as it is read, into a dense model.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moonlet.config import ModelConfig
from moonlet.model import Transformer


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, or holds tensors that do not fit the model."""


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")
_FUSED_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")  # transformers-5 in-memory form
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$)")
_SUFFIX = {"weight": "", "weight_packed": "_packed", "weight_scale": "_scale"}


# ------------------------------------------------------------------------------------------------------
# building a model in place


def build(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
          packed_layers: set[int] | None = None) -> Transformer:
    """Allocate an uninitialized model directly in `dtype` on `device` (the router stays fp32).
    `packed_layers`: layers whose routed experts are INT4-packed on disk (None: all, if the config is quantized)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.quantization_config and (packed_layers is None or packed_layers):
        from moonlet import quant  # INT4 experts: packed tensors instead of bf16 weights

        quant.replace_experts_for_checkpoint(model, cfg.quantization_config, layers=packed_layers)
    model = cast_weights(model, dtype)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor: tie again
        model.lm_head.weight = model.embed_tokens.weight
    return model


def cast_weights(model: Transformer, dtype: torch.dtype | None) -> Transformer:
    """model.to(dtype) with the routers kept fp32 (HF keeps gate.weight so too): bf16-rounded router weights
    pick other experts in near ties, and the balancing bias moves below bf16's resolution."""
    model = model.to(dtype=dtype) if dtype is not None else model
    for moe in model.moe_layers():
        moe.gate.float()
    return model


def _disk_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def _resolve(disk: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """Disk tensor name -> (moonlet state name, expert index or None); None for tensors moonlet ignores."""
    if _IGNORED.search(disk):
        return None
    m = _LAYER.match(disk)
    if m and cfg.num_hidden_layers <= int(m.group(1)) < cfg.num_hidden_layers + cfg.num_nextn_predict_layers:
        return None  # MTP layers (DeepSeek-V3 layer 61) are not part of the base model; other extra layers
        # are reported as unexpected (a config with too few num_hidden_layers must not drop them silently)
    m = _EXPERT.match(disk)
    if m:
        layer, expert, proj, suffix = m.groups()
        if suffix == "weight_shape":
            return ("", int(expert))  # checked against the packed tensor's shape, nothing to store
        if suffix not in _SUFFIX:
            return (disk, None)  # unexpected: reported by the caller
        return (f"layers.{layer}.mlp.experts.{proj}{_SUFFIX[suffix]}", int(expert))
    if disk.startswith("model."):
        return (disk[len("model."):], None)
    return (disk, None)


# ------------------------------------------------------------------------------------------------------
# load


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names, got "
                                  f"{str(weight_map)[:80]}")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).exists():
                raise CheckpointError(f"{index} names shard {f}, which is missing from {path}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
    owner: dict[str, Path] = {}
    for file in files if len(files) > 1 else ():  # without an index every file is read: two copies of a model?
        with open_shard(file) as f:
            for name in f.keys():
                if name in owner:
                    raise CheckpointError(f"{path}: tensor {name!r} is in both {owner[name].name} and {file.name} "
                                          "(and no model.safetensors.index.json says which to read); move one away")
                owner[name] = file
    return files


def open_shard(file: Path):
    """safe_open, with a truncated or corrupt file named in a CheckpointError (safetensors raises its own
    error types for bad headers)."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read safetensors file ({e}); is it truncated?") from e


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype the commands (generate, serve, agent, bench) load weights in unless told: bfloat16 on CUDA
    (what K2 runs in, and what the kernels are tuned for), float32 elsewhere (CPU bf16 matmuls are slow, and
    the parity tests hold fp32 to HF's tokens). `load` itself keeps float32, the training master dtype."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def model_dir(path_or_preset: str | Path) -> str:
    """What --model names: a preset, a checkpoint directory, or a training run (or its checkpoints/), which
    means the run's newest complete checkpoint. Anything else is a CheckpointError saying so."""
    from moonlet.config import PRESETS
    from moonlet.runs import latest_checkpoint

    name, path = str(path_or_preset), Path(path_or_preset)
    if not path.is_dir():
        if name in PRESETS:
            return name
        raise CheckpointError(f"{name!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")
    if (path / "config.json").exists():
        return name
    ckpt = latest_checkpoint(path.parent if path.name == "checkpoints" else path)
    return str(ckpt) if ckpt is not None else name


def model_config(path_or_preset: str | Path) -> ModelConfig:
    """The config of what --model names (see model_dir), or of a config.json file, without reading weights."""
    if Path(path_or_preset).suffix == ".json" and not Path(path_or_preset).is_dir():
        return ModelConfig.from_hf(path_or_preset)
    name = model_dir(path_or_preset)
    return ModelConfig.from_hf(name) if Path(name).is_dir() else ModelConfig.from_preset(name)


def load(path_or_preset: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         seed: int = 0) -> Transformer:
    """A model from an HF-format directory (or a training run's newest checkpoint), or a preset name with
    random weights (seeded)."""
    path = Path(model_dir(path_or_preset))
    if not path.is_dir():
        model = build(ModelConfig.from_preset(str(path_or_preset)), device, dtype)
        model.init_weights(seed=seed)
        return model.eval()
    cfg = ModelConfig.from_hf(path)
    fp8 = stored_fp8(cfg)
    model = build(cfg, device, dtype, packed_layers=_packed_layers(path, cfg))
    load_weights(model, path, fp8)
    return model.eval()


def stored_fp8(cfg: ModelConfig) -> tuple[int, int] | None:
    """FP8 block storage (DeepSeek-V3, Kimi K2 base / instruct) is read into a dense model: its quantization_config
    leaves `cfg` (a save writes dense weights) and its block size is returned for the loader."""
    from moonlet import quant

    if not quant.is_fp8(cfg.quantization_config):
        return None
    return quant.fp8_block_size(cfg.extra.pop("quantization_config"))


def _packed_layers(path: Path, cfg: ModelConfig) -> set[int]:
    """Layers whose experts are stored INT4-packed: recognized by `weight_packed` tensors on disk (the config's
    `ignore` regexes are about module types and cannot be matched by name reliably)."""
    layers = set()
    for file in _shard_files(path):
        with open_shard(file) as f:  # (a truncated file is a CheckpointError naming it)
            names = list(f.keys())
        for name in names:
            m = _EXPERT.match(name)
            if m and m.group(4) == "weight_packed" and int(m.group(1)) < cfg.num_hidden_layers:
                layers.add(int(m.group(1)))
    if layers and not cfg.quantization_config:
        raise CheckpointError(f"{path}: experts are stored as weight_packed but config.json has no "
                              "quantization_config (group size and bits are read from it)")
    return layers


class DiskReader:
    """Tensors of a checkpoint by name, FP8 ones dequantized with their `weight_scale_inv` (looked up in any
    shard: a scale usually sits beside its weight, but nothing says it must)."""

    SCALE = "_scale_inv"

    def __init__(self, path: Path, fp8_block: tuple[int, int] | None):
        self.path, self.fp8_block = path, fp8_block
        self._keys: dict[Path, set[str]] = {}
        self._where: dict[str, Path] | None = None

    def get(self, f, file: Path, disk: str) -> torch.Tensor:
        try:
            t = f.get_tensor(disk)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {disk!r} ({e}); is the file truncated?") from e
        if t.dtype != torch.float8_e4m3fn:
            return t
        if self.fp8_block is None:
            raise CheckpointError(f"{file.name}: {disk!r} is float8 but config.json has no FP8 quantization_config "
                                  "(quant_method 'fp8', weight_block_size)")
        from moonlet.quant import dequantize_fp8

        name = disk + self.SCALE
        if name in self._keys.setdefault(file, set(f.keys())):
            scale = f.get_tensor(name)
        else:
            if self._where is None:
                self._where = {}
                for other in _shard_files(self.path):
                    with open_shard(other) as g:
                        self._where.update(dict.fromkeys(g.keys(), other))
            if name not in self._where:
                raise CheckpointError(f"{file.name}: float8 tensor {disk!r} has no {name!r} in the checkpoint")
            with open_shard(self._where[name]) as g:
                scale = g.get_tensor(name)
        try:
            return dequantize_fp8(t, scale, self.fp8_block)
        except ValueError as e:
            raise CheckpointError(f"{file.name}: float8 tensor {disk!r}: {e}") from e


def not_loaded(disk: str, cfg: ModelConfig) -> bool:
    """Disk tensors a model of `cfg` does not take: MTP layers, rotary buffers, a tied head, and FP8 scales
    (read with their weights)."""
    return (cfg.tie_word_embeddings and disk == "lm_head.weight") or disk.endswith(DiskReader.SCALE) or \
        _resolve(disk, cfg) is None


@torch.no_grad()
def load_weights(model: Transformer, path: str | Path, fp8_block: tuple[int, int] | None = None) -> None:
    """Copy every tensor of the checkpoint into `model`, shard by shard, checking names and shapes.
    `fp8_block`: the checkpoint stores FP8 weights in blocks of this size (see stored_fp8)."""
    path = Path(path)
    cfg = model.cfg
    state = dict(model.state_dict(keep_vars=True))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    filled: dict[str, set[int] | bool] = {}
    reader = DiskReader(path, fp8_block)
    for file in _shard_files(path):
        with open_shard(file) as f:
            for disk in f.keys():
                if not_loaded(disk, cfg):
                    continue
                fused = _FUSED_EXPERT.match(disk)
                if fused:
                    _load_fused_experts(reader.get(f, file, disk), disk, fused, state, filled, file)
                    continue
                target = _resolve(disk, cfg)
                if target[0] == "":  # weight_shape: must match the packed module's
                    layer, _, proj, _ = _EXPERT.match(disk).groups()
                    experts = model.get_submodule(f"layers.{layer}.mlp.experts")
                    want = experts.unpacked_shape(proj) if hasattr(experts, "unpacked_shape") else None
                    if want is None or f.get_tensor(disk).tolist() != list(want):
                        raise CheckpointError(f"{file.name}: {disk!r} is {f.get_tensor(disk).tolist()}, the model "
                                              f"expects {want} (an INT4 expert needs a quantization_config)")
                    continue
                name, expert = target
                if name not in state and 0 in f.get_slice(disk).get_shape():
                    continue  # e.g. HF's zero-width shared expert when n_shared_experts = 0
                if name not in state:
                    raise CheckpointError(f"{file.name}: unexpected tensor {disk!r} (no such tensor in the "
                                          f"{cfg.model_type} model built from config.json)")
                if expert is not None and expert >= state[name].shape[0]:
                    raise CheckpointError(f"{file.name}: {disk!r} is expert {expert}, but config.json has "
                                          f"n_routed_experts = {state[name].shape[0]}")
                dest = state[name] if expert is None else state[name][expert]
                tensor = reader.get(f, file, disk)
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise CheckpointError(f"{file.name}: tensor {disk!r} has shape {tuple(tensor.shape)}, the model "
                                          f"expects {tuple(dest.shape)}")
                dest.copy_(tensor)
                if expert is None:
                    filled[name] = True
                else:
                    filled.setdefault(name, set()).add(expert)
    missing = []
    for name, t in state.items():
        got = filled.get(name)
        if name.endswith("e_score_correction_bias") and got is None:
            continue  # checkpoints trained without aux-free balancing may omit it: zero is the right value
        if name.split(".")[-2:-1] == ["experts"] and isinstance(got, set):
            lost = sorted(set(range(t.shape[0])) - got)
            if lost:
                missing.append(f"{_disk_name(name)} (experts {lost[:8]}{'...' if len(lost) > 8 else ''})")
        elif got is None:
            missing.append(_disk_name(name))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. "
                              + ", ".join(missing[:5]))


def _load_fused_experts(tensor: torch.Tensor, disk: str, match: re.Match, state: dict, filled: dict,
                        file: Path) -> None:
    """Stacked experts as transformers-5 keeps them in memory: gate_up_proj [E, 2I, D], down_proj [E, D, I]."""
    layer, kind = match.groups()
    if kind == "down_proj":
        parts = {"down_proj": tensor}
    else:
        parts = dict(zip(("gate_proj", "up_proj"), tensor.chunk(2, dim=1)))
    for proj, t in parts.items():
        name = f"layers.{layer}.mlp.experts.{proj}"
        if name not in state:
            raise CheckpointError(f"{file.name}: unexpected tensor {disk!r}")
        if tuple(t.shape) != tuple(state[name].shape):
            raise CheckpointError(f"{file.name}: tensor {disk!r} gives {proj} shape {tuple(t.shape)}, the model "
                                  f"expects {tuple(state[name].shape)}")
        state[name].copy_(t)
        filled[name] = set(range(t.shape[0]))


# ------------------------------------------------------------------------------------------------------
# save


def disk_tensors(model: Transformer):
    """Yield (disk name, tensor) in checkpoint order, splitting stacked experts per expert."""
    cfg = model.cfg
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if ".mlp.experts." in name:
            prefix, last = name.rsplit(".", 1)
            proj, _, kind = last.partition("_proj")
            suffix = {"": "weight", "_packed": "weight_packed", "_scale": "weight_scale"}[kind]
            for e in range(t.shape[0]):
                yield f"model.{prefix}.{e}.{proj}_proj.{suffix}", t[e]
                if kind == "_packed":
                    shape = model.get_submodule(prefix).unpacked_shape(f"{proj}_proj")
                    yield f"model.{prefix}.{e}.{proj}_proj.weight_shape", torch.tensor(shape, dtype=torch.int64)
        else:
            yield _disk_name(name), t


def parse_size(size: int | str) -> int:
    """A shard size limit in bytes: an int, or '5GB' / '500MB' / '2.5G' (powers of 1000)."""
    n = size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)i?B?\s*", size.upper())
        n = int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2) or " ")) if m else 0
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"max_shard_size={size!r}: use a positive number of bytes or a size like '5GB' / '500MB'")
    return n


class ShardWriter:
    """Tensors in, safetensors shards out, each written as soon as it is full: memory holds one shard, not the
    checkpoint. Shards keep temporary names until `close` renames them and writes config.json and the index
    last, so a crash never leaves a checkpoint that looks whole."""

    _OURS = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")

    def __init__(self, directory: str | Path, max_shard_size: int | str = "5GB"):
        self.out = Path(directory)
        if self.out.exists() and not self.out.is_dir():
            raise CheckpointError(f"{self.out} is a file, not a directory")
        foreign = sorted(f.name for f in self.out.glob("*.safetensors") if not self._OURS.match(f.name))
        if foreign:  # a single-shard checkpoint has no index: the loader reads every *.safetensors there
            raise CheckpointError(f"{self.out} holds other safetensors files ({', '.join(foreign[:3])}), which a "
                                  "load would read as part of this checkpoint; choose an empty directory")
        self.limit = parse_size(max_shard_size)  # before anything is created
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.parts: list[tuple[Path, list[str]]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.size and self.size + nbytes > self.limit:
            self._flush()
        # a copy (one, from any device): views of one stacked parameter share storage, which safetensors refuses
        self.shard[name] = t.detach().to("cpu", copy=True).contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        tmp = self.out / f"model.part{len(self.parts):05d}.safetensors.tmp"
        save_file(self.shard, str(tmp), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600: a model served or shared is read by others
        self.parts.append((tmp, list(self.shard)))
        self.shard, self.size = {}, 0

    def close(self, config: dict) -> Path:
        if self.shard or not self.parts:
            self._flush()
        n, weight_map = len(self.parts), {}
        for i, (tmp, names) in enumerate(self.parts):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.out / fname)
            weight_map.update(dict.fromkeys(names, fname))
        written = set(weight_map.values())
        for old in self.out.glob("model*.safetensors"):  # shards of an earlier checkpoint here would be read too
            if self._OURS.match(old.name) and old.name not in written:
                old.unlink()
        tmp = self.out / "config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, self.out / "config.json")
        index = self.out / "model.safetensors.index.json"
        if n > 1:
            tmp = self.out / "model.safetensors.index.json.tmp"
            tmp.write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))
            os.replace(tmp, index)
        elif index.exists():
            index.unlink()
        return self.out


def config_for_disk(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for tensors saved in `dtype`."""
    d = cfg.to_hf()
    d["torch_dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in d:
        d["dtype"] = d["torch_dtype"]
    return d


def keeps_fp32(disk_name: str) -> bool:
    """The router's correction bias stays fp32 on disk (as in K2's and DeepSeek-V3's files): balancing moves
    it by steps far below bf16's resolution."""
    return disk_name.endswith("e_score_correction_bias")


@torch.no_grad()
def save(model: Transformer, directory: str | Path, max_shard_size: int | str = "5GB",
         dtype: torch.dtype | None = None) -> Path:
    """Write config.json and safetensors shards (+ index) in the HF / K2 layout (see ShardWriter)."""
    writer = ShardWriter(directory, max_shard_size)
    for name, t in disk_tensors(model):
        if dtype is not None and t.is_floating_point() and not keeps_fp32(name):
            t = t.to(dtype)
        writer.add(name, t)
    return writer.close(config_for_disk(model.cfg, dtype or model.embed_tokens.weight.dtype))


def checkpoint_tensor_names(path: str | Path) -> dict[str, list[str]]:
    """Disk tensor names per shard file (for `moonlet info DIR` and debugging)."""
    names: dict[str, list[str]] = defaultdict(list)
    for file in _shard_files(Path(path)):
        with open_shard(file) as f:
            names[file.name] = list(f.keys())
    return dict(names)
