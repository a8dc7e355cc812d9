"""ModelConfig: every architecture field of the K2 / DeepSeek-V3 family, named presets, HF config.json I/O.

Field names are the HF config.json names, so a config file maps onto the dataclass one to one. Keys we do
not model (torch_dtype, quantization_config, auto_map, ...) are kept in `extra` and written back verbatim,
so `ModelConfig.from_hf(d).to_hf() == d` for real checkpoint configs.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config field is missing or has a value the model cannot run with."""


@dataclass
class ModelConfig:
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # one routed / shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 64  # unused by MLA (every head has its own k/v); kept for round-trip
    q_lora_rank: int | None = 1536  # None: plain q_proj (Moonlight, DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    rope_scaling: dict | None = None  # canonical form: {"type": "yarn", "factor": ..., ...} or None
    rope_interleave: bool = True
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    pad_token_id: int | None = 163839
    num_nextn_predict_layers: int = 0  # MTP layers present in a checkpoint; moonlet ignores their weights
    model_type: str = "kimi_k2"
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------------
    # derived values (computed, never stored)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_latent_dim(self) -> int:
        """Values cached per token per layer by the absorbed MLA decode: latent + rotated rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer: int) -> bool:
        # moe_layer_freq is read and written back but, as in HF transformers and the K2 / DeepSeek-V3 weights
        # (all 1), not used: every layer from first_k_dense_replace on is MoE.
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @property
    def yarn_original_max_position(self) -> int:
        return (self.rope_scaling or {}).get("original_max_position_embeddings") or self.max_position_embeddings

    @property
    def yarn_factor(self) -> float:
        """The explicit factor, else max_position_embeddings / original (HF's rule when none is written)."""
        return (self.rope_scaling or {}).get("factor") or self.max_position_embeddings / self.yarn_original_max_position

    @property
    def yarn_mscale(self) -> float:
        """YaRN's attention-temperature correction m = 0.1 * mscale_all_dim * ln(factor) + 1, as HF applies it."""
        rs = self.rope_scaling
        if not rs or not rs.get("mscale_all_dim"):
            return 1.0
        factor = self.yarn_factor
        return 0.1 * rs["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0

    @property
    def softmax_scale(self) -> float:
        """(nope + rope)^-0.5 times m^2: 0.144680 for K2 (forgetting m^2 halves it)."""
        return self.qk_head_dim**-0.5 * self.yarn_mscale**2

    # ----------------------------------------------------------------------------------------------
    # validation

    def validate(self) -> None:
        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"ModelConfig.{name} = {getattr(self, name)!r}: {why}")

        for f in fields(self):  # types first: a JSON string "1e-6" must not reach a comparison
            kinds = f.type.split(" | ")
            if f.name != "extra" and not any(_is_a(getattr(self, f.name), k) for k in kinds):
                need(False, f.name, "must be " + " or ".join(_TYPE_NAMES[k] for k in kinds))
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                     "moe_layer_freq"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "rotary dims come in pairs, must be even")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "must be a positive int, or null for a plain q_proj")
        need(self.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0 (past the last layer: all dense)")
        need(self.hidden_act == "silu", "hidden_act", "only SwiGLU ('silu') is implemented")
        need(math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0, "rms_norm_eps", "must be a finite number > 0")
        need(math.isfinite(self.rope_theta) and self.rope_theta > 0, "rope_theta", "must be a finite number > 0")
        if self.first_k_dense_replace > 0 or self.n_routed_experts == 0:
            need(self.intermediate_size > 0, "intermediate_size", "dense layers need a positive MLP width")
        if self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be a positive int")
            need(self.scoring_func == "sigmoid", "scoring_func",
                 "only the sigmoid router of DeepSeek-V3/K2 is implemented")
            need(self.topk_method in ("noaux_tc", "greedy"), "topk_method", "must be 'noaux_tc' or 'greedy'")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"must be between 1 and n_routed_experts={self.n_routed_experts}")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must divide n_routed_experts={self.n_routed_experts}")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be between 1 and n_group={self.n_group}")
            group_size = self.n_routed_experts // self.n_group
            need(self.n_group == 1 or group_size >= 2, "n_group", "group scores sum the top-2 experts of a "
                 "group, so each group needs at least 2 experts")
            need(self.topk_group * group_size >= self.num_experts_per_tok, "topk_group",
                 f"the {self.topk_group} kept groups hold {self.topk_group * group_size} experts, fewer than "
                 f"num_experts_per_tok={self.num_experts_per_tok}")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        need(math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0, "routed_scaling_factor",
             "must be a finite number > 0")
        need(math.isfinite(self.initializer_range) and self.initializer_range >= 0, "initializer_range",
             "must be a finite number >= 0")
        for name in ("n_routed_experts", "num_nextn_predict_layers"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            need(kind in ("yarn", "default", None), "rope_scaling", "only YaRN rope scaling is implemented")
            for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                        "mscale_all_dim"):  # read as numbers by the rotary embedding
                v = rs.get(key)
                need(v is None or (_is_a(v, "float") and math.isfinite(v) and v >= 0), "rope_scaling",
                     f"{key} must be a finite number >= 0, not {v!r}")
            omp = rs.get("original_max_position_embeddings")
            need(omp is None or (_is_a(omp, "int") and omp > 0), "rope_scaling",
                 f"original_max_position_embeddings must be a positive int, not {omp!r}")
            if kind == "yarn":
                need(self.yarn_factor >= 1, "rope_scaling", "YaRN factor must be >= 1")

    # ----------------------------------------------------------------------------------------------
    # presets

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return copy.deepcopy(PRESETS[name])

    def with_(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return replace(self, **changes)

    # ----------------------------------------------------------------------------------------------
    # HF config.json

    @classmethod
    def from_hf(cls, d: dict | str | Path) -> ModelConfig:
        """Read an HF config (dict, config.json path or checkpoint directory) of any supported style:
        K2 (`kimi_k2`, `rope_scaling`), DeepSeek-V3 (groups, MTP), Moonlight (`q_lora_rank: null`) and
        transformers-5 (`rope_parameters`, `head_dim`, `qk_head_dim`, `dtype`)."""
        where: Any = "config"
        if not isinstance(d, dict):
            path = Path(d)
            path = where = path / "config.json" if path.is_dir() else path
            if not path.exists():
                raise ConfigError(f"{path}: no such config file" if path.name != "config.json" else
                                  f"{path}: no config.json found")
            try:
                d = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from e
            if not isinstance(d, dict):
                raise ConfigError(f"{path}: expected a JSON object of config fields, got a {type(d).__name__}")
        src = dict(d)
        for key in ("rope_parameters", "rope_scaling", "quantization_config"):  # read before validate() runs
            if src.get(key) is not None and not isinstance(src[key], dict):
                raise ConfigError(f"{where}: {key} = {src[key]!r}: must be an object or null")
        known = {f.name for f in fields(cls)} - {"extra", "rope_scaling", "rope_theta"}
        _check_keys(src, known, where)
        kwargs: dict[str, Any] = {k: src[k] for k in known if k in src}
        # rope: transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters
        # (which carries rope_theta and both `type` and `rope_type`).
        if "rope_parameters" in src and src["rope_parameters"] is not None:
            rp = dict(src["rope_parameters"])
            kwargs["rope_theta"] = rp.pop("rope_theta", src.get("rope_theta", 10000.0))
            kind = rp.get("rope_type", rp.get("type", "default"))
            kwargs["rope_scaling"] = None if kind == "default" else rp
        else:
            kwargs["rope_theta"] = src.get("rope_theta", 10000.0)
            kwargs["rope_scaling"] = copy.deepcopy(src.get("rope_scaling"))
        if kwargs.get("num_key_value_heads") is None and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if "num_nextn_predict_layers" not in kwargs and "num_mtp_layers" in src:
            kwargs["num_nextn_predict_layers"] = src["num_mtp_layers"]
        for key, default in HF_DEFAULTS.items():  # what transformers reads for a key the file leaves out
            kwargs.setdefault(key, default)
        for key, default in (("n_group", 1), ("topk_group", 1), ("moe_layer_freq", 1),
                             ("first_k_dense_replace", 0), ("n_shared_experts", 0)):
            if kwargs.get(key, 0) is None:
                kwargs[key] = default
        try:
            cfg = cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}" if isinstance(where, Path) else str(e)) from None
        cfg.extra = {k: v for k, v in src.items() if k not in known and k not in _NOT_EXTRA}
        cfg.extra["__key_order__"] = list(src)
        return cfg

    def to_hf(self) -> dict:
        """The config.json dict; unknown keys read by from_hf are written back unchanged and in place."""
        extra = {k: copy.deepcopy(v) for k, v in self.extra.items() if k != "__key_order__"}
        out = {k: v for k, v in asdict(self).items() if k not in ("extra", "rope_scaling")}
        out["architectures"] = extra.pop("architectures", ["DeepseekV3ForCausalLM"])
        if "num_mtp_layers" in self.extra.get("__key_order__", []):
            extra["num_mtp_layers"] = None
        if "rope_parameters" in extra:  # transformers-5 style, keep it
            rp = extra.pop("rope_parameters") or {}
            new = {"rope_theta": self.rope_theta, "rope_type": "default"} if self.rope_scaling is None else {
                **self.rope_scaling, "rope_theta": self.rope_theta}
            out["rope_parameters"] = {k: new[k] for k in rp if k in new} | new
            del out["rope_theta"]
        else:
            out["rope_scaling"] = copy.deepcopy(self.rope_scaling)
        if "num_mtp_layers" in extra:  # transformers-5 name for the MTP layer count
            extra["num_mtp_layers"] = out.pop("num_nextn_predict_layers")
        out.update(extra)
        order = self.extra.get("__key_order__")
        if order is None:
            return out
        # a config read from a file: write its keys back in its order, and add a field it lacked only
        # when the value differs from the default (so from_hf(d).to_hf() == d)
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        added = {k: v for k, v in out.items() if k not in order and v != defaults.get(k, object())}
        return {k: out[k] for k in order if k in out} | added

    def save(self, directory: str | Path) -> None:
        """Write DIRECTORY/config.json in HF's format (the directory is created, as save_pretrained does)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_hf(), indent=2) + "\n")

    @property
    def quantization_config(self) -> dict | None:
        return self.extra.get("quantization_config")


_NOT_EXTRA = ("rope_theta", "rope_scaling", "num_mtp_layers")

_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict, "list[int]": list,
          "None": type(None)}
_TYPE_NAMES = {"int": "an int", "float": "a number", "str": "a string", "bool": "true/false", "dict": "an object",
               "list[int]": "a list of ints", "None": "null"}


def _is_a(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("int", "float"):  # JSON true is not a size
        return False
    if kind == "list[int]":
        return isinstance(value, list) and all(_is_a(v, "int") for v in value)
    return isinstance(value, _TYPES[kind])


# Shape keys every K2 / DeepSeek-V3 / Moonlight / transformers config.json writes. A file without one would get
# K2's default (a 7168-wide, 61-layer model), so their absence is an error rather than a silent fill-in.
# DeepseekV3Config's defaults (transformers, and K2's own configuration_deepseek.py) for the keys that change
# the math without changing a tensor's shape: a config.json that leaves one out means these, not K2's values.
HF_DEFAULTS = {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "max_position_embeddings": 4096,
               "first_k_dense_replace": 3, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_interleave": True,
               "n_shared_experts": 1}
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "num_experts_per_tok")


def _check_keys(src: dict, known: set[str], where: Any) -> None:
    """Missing shape keys are an error; an unknown key close to a missing field (a typo: `hidden_sise`) is
    named. Other unknown keys (architectures, torch_dtype, auto_map, quantization_config, ...) are fine."""
    unknown = [k for k in src if k not in known and k not in _NOT_EXTRA]
    typos = {}
    for name in sorted(known - set(src)):
        close = difflib.get_close_matches(name, unknown, n=1, cutoff=0.85)
        if close:
            typos[name] = close[0]
    hint = "".join(f"; {typos[k]!r} looks like a typo of {k!r}" for k in typos)
    missing = [k for k in REQUIRED_HF_KEYS if k not in src]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)} (needed to size the model; the defaults are "
                          f"Kimi K2's full size){hint}")
    if typos:
        warnings.warn(f"{where}: unknown keys ignored{hint}", stacklevel=3)

# --------------------------------------------------------------------------------------------------
# presets

_K2_YARN = {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

# moonlet's own small models use the default tokenizer: 32512 BPE ranks + K2's 256 special-token slots.
# model_type deepseek_v3 so that transformers' DeepseekV3ForCausalLM maps the per-expert names on load.
_SMALL_VOCAB = dict(vocab_size=32768, bos_token_id=32512, eos_token_id=32513, pad_token_id=32767,
                    model_type="deepseek_v3")

PRESETS: dict[str, ModelConfig] = {
    # Kimi K2 Thinking, exactly (spec section 1).
    "kimi-k2": ModelConfig(rope_scaling=_K2_YARN, eos_token_id=163586),
    "deepseek-v3": ModelConfig(
        vocab_size=129280, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
        first_k_dense_replace=3, n_group=8, topk_group=4, routed_scaling_factor=2.5, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        max_position_embeddings=163840, bos_token_id=0, eos_token_id=1, pad_token_id=None,
        num_nextn_predict_layers=1, model_type="deepseek_v3"),
    "moonlight-16b-a3b": ModelConfig(
        hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=2, routed_scaling_factor=2.446, rms_norm_eps=1e-5,
        max_position_embeddings=8192, model_type="deepseek_v3"),
    # small trainable models (moonlet's own)
    "tiny": ModelConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        routed_scaling_factor=2.5, max_position_embeddings=32768, rope_theta=50000.0, **_SMALL_VOCAB),
    "nano": ModelConfig(
        hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1,
        routed_scaling_factor=2.5, max_position_embeddings=4096, **_SMALL_VOCAB),
    "small": ModelConfig(
        hidden_size=1024, intermediate_size=4096, moe_intermediate_size=704, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
        routed_scaling_factor=2.5, max_position_embeddings=8192, **_SMALL_VOCAB),
    # the training benchmark's MoE-dominated shape (issue: 2.24B total, 0.33B active non-embedding)
    "moe-2b": ModelConfig(
        hidden_size=1024, intermediate_size=4096, moe_intermediate_size=704, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=1,
        routed_scaling_factor=2.5, max_position_embeddings=8192, **_SMALL_VOCAB),
}
