"""Model configs parsed from GGUF metadata (one frozen dataclass per architecture) and size strings.

A new architecture is one more ``ModelConfig`` subclass registered in ``CONFIGS``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .errors import BudgetError, UnsupportedError, BadFileError


@dataclass(frozen=True)
class ModelConfig:
    """What every MoE architecture has. Field names follow llama.cpp's hparams where they exist."""

    arch: ClassVar[str] = ""
    rope_neox: ClassVar[bool] = False  # rotate halves (NEOX) rather than adjacent pairs

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    rope_theta: float
    rms_eps: float
    n_expert_shared: int = 0
    n_ff_shared: int = 0
    expert_weights_norm: bool = True
    expert_gating: str = "softmax"

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "ModelConfig":
        raise NotImplementedError

    @property
    def moe_layers(self) -> range:
        """Indices of the layers whose FFN is a routed MoE block."""
        return range(self.n_layer)

    def as_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **{f.name: getattr(self, f.name) for f in fields(self)}}


class _Keys:
    """Reads ``{arch}.<key>`` metadata with a clear error when a required key is missing."""

    def __init__(self, md: Mapping[str, Any], arch: str):
        self.md, self.arch = md, arch

    def get(self, key: str, default: Any = None) -> Any:
        full = f"{self.arch}.{key}" if not key.startswith(("general.", "tokenizer.")) else key
        if full in self.md:
            return self.md[full]
        if default is None:
            raise BadFileError(f"GGUF metadata lacks {full!r}, which a {self.arch} model needs")
        return default


def _n_vocab(md: Mapping[str, Any], k: _Keys) -> int:
    if f"{k.arch}.vocab_size" in md:
        return int(md[f"{k.arch}.vocab_size"])
    return len(k.get("tokenizer.ggml.tokens"))


def _require_experts(arch: str, n_expert: int, n_used: int) -> None:
    if n_expert <= 1:
        raise UnsupportedError(f"this {arch} model has no routed experts: flashmoe-stream runs Mixture-of-Experts models only")
    if not 0 < n_used <= n_expert:
        raise BadFileError(f"{arch}: expert_used_count={n_used} is not in 1..expert_count={n_expert}")


@dataclass(frozen=True)
class Qwen3MoeConfig(ModelConfig):
    """Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): per-head q/k RMSNorm, NEOX RoPE, softmax top-k."""

    arch: ClassVar[str] = "qwen3moe"
    rope_neox: ClassVar[bool] = True

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "Qwen3MoeConfig":
        k = _Keys(md, cls.arch)
        n_embd, n_head = int(k.get("embedding_length")), int(k.get("attention.head_count"))
        n_expert, n_used = int(k.get("expert_count")), int(k.get("expert_used_count"))
        _require_experts(cls.arch, n_expert, n_used)
        return cls(
            n_layer=int(k.get("block_count")), n_embd=n_embd, n_head=n_head,
            n_head_kv=int(k.get("attention.head_count_kv", n_head)),
            head_dim=int(k.get("attention.key_length", n_embd // n_head)),
            n_vocab=_n_vocab(md, k), n_ctx_train=int(k.get("context_length")),
            n_expert=n_expert, n_expert_used=n_used, n_ff_exp=int(k.get("expert_feed_forward_length")),
            rope_theta=float(k.get("rope.freq_base", 10000.0)),
            rms_eps=float(k.get("attention.layer_norm_rms_epsilon")),
        )


@dataclass(frozen=True)
class LlamaMoeConfig(ModelConfig):
    """``llama`` with experts (Mixtral 8x7B / 8x22B): experts use feed_forward_length, normal RoPE."""

    arch: ClassVar[str] = "llama"

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "LlamaMoeConfig":
        k = _Keys(md, cls.arch)
        n_embd, n_head = int(k.get("embedding_length")), int(k.get("attention.head_count"))
        n_expert, n_used = int(k.get("expert_count", 0)), int(k.get("expert_used_count", 0))
        _require_experts(cls.arch, n_expert, n_used)
        return cls(
            n_layer=int(k.get("block_count")), n_embd=n_embd, n_head=n_head,
            n_head_kv=int(k.get("attention.head_count_kv", n_head)),
            head_dim=int(k.get("rope.dimension_count", n_embd // n_head)),
            n_vocab=_n_vocab(md, k), n_ctx_train=int(k.get("context_length")),
            n_expert=n_expert, n_expert_used=n_used, n_ff_exp=int(k.get("feed_forward_length")),
            rope_theta=float(k.get("rope.freq_base", 10000.0)),
            rms_eps=float(k.get("attention.layer_norm_rms_epsilon")),
        )


@dataclass(frozen=True)
class Deepseek2Config(ModelConfig):
    """DeepSeek-V2 / V2-Lite / V3 / R1 (``deepseek2``): multi-head latent attention (MLA), leading dense
    blocks, shared experts, softmax (V2) or sigmoid + selection bias (V3) routing with expert groups.

    Keys as llama.cpp's converter writes them. ``head_dim`` is the MLA query/key head size
    (qk_nope + qk_rope); ``mla_split`` tells which layout the file uses for the latent up-projection:
    the split ``attn_k_b``/``attn_v_b`` (current converters, ``attention.key_length_mla`` present) or
    the legacy ``attn_kv_b``.
    """

    arch: ClassVar[str] = "deepseek2"

    q_lora_rank: int = 0  # 0: a direct attn_q (V2-Lite)
    kv_lora_rank: int = 512
    qk_rope_dim: int = 64
    v_head_dim: int = 128
    mla_split: bool = True
    n_layer_dense_lead: int = 0
    n_ff: int = 0  # the leading dense blocks' FFN width
    expert_weights_scale: float = 1.0
    n_expert_groups: int = 0
    n_group_used: int = 0
    # RoPE scaling (YaRN): factor 1 means none
    rope_scaling_factor: float = 1.0
    rope_orig_ctx: int = 0
    rope_yarn_log_mul: float = 0.0  # mscale_all_dim (the file stores 0.1 x this)
    rope_attn_factor: float = 1.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0

    @property
    def qk_nope_dim(self) -> int:
        return self.head_dim - self.qk_rope_dim

    @property
    def moe_layers(self) -> range:
        return range(self.n_layer_dense_lead, self.n_layer)

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "Deepseek2Config":
        k = _Keys(md, cls.arch)
        n_embd, n_head = int(k.get("embedding_length")), int(k.get("attention.head_count"))
        n_expert, n_used = int(k.get("expert_count", 0)), int(k.get("expert_used_count", 0))
        _require_experts(cls.arch, n_expert, n_used)
        kv_lora = int(k.get("attention.kv_lora_rank"))
        rope_dim = int(k.get("rope.dimension_count"))
        mla_split = f"{cls.arch}.attention.key_length_mla" in md
        if mla_split:  # key_length is then kv_lora_rank + rope (the MQA view of the latent cache)
            head_dim, v_dim = int(k.get("attention.key_length_mla")), int(k.get("attention.value_length_mla"))
        else:
            head_dim, v_dim = int(k.get("attention.key_length")), int(k.get("attention.value_length"))
        if head_dim <= rope_dim:
            raise BadFileError(f"{cls.arch}: key head size {head_dim} must exceed the RoPE part {rope_dim}")
        gating = int(k.get("expert_gating_func", 0))
        if gating not in (0, 1, 2):
            raise UnsupportedError(f"{cls.arch}: expert_gating_func={gating} is not supported (1 softmax, 2 sigmoid)")
        n_groups, n_group_used = int(k.get("expert_group_count", 0)), int(k.get("expert_group_used_count", 0))
        if n_groups > 1 and (n_expert % n_groups or not 0 < n_group_used <= n_groups):
            raise BadFileError(f"{cls.arch}: {n_expert} experts in {n_groups} groups, {n_group_used} used: inconsistent")
        scaling = str(k.get("rope.scaling.type", "none"))
        factor = float(k.get("rope.scaling.factor", 0.0)) if scaling == "yarn" else 0.0
        if scaling not in ("none", "yarn"):
            raise UnsupportedError(f"{cls.arch}: RoPE scaling {scaling!r} is not supported (only yarn)")
        return cls(
            n_layer=int(k.get("block_count")), n_embd=n_embd, n_head=n_head,
            n_head_kv=int(k.get("attention.head_count_kv", 1)), head_dim=head_dim,
            n_vocab=_n_vocab(md, k), n_ctx_train=int(k.get("context_length")),
            n_expert=n_expert, n_expert_used=n_used, n_ff_exp=int(k.get("expert_feed_forward_length")),
            rope_theta=float(k.get("rope.freq_base", 10000.0)),
            rms_eps=float(k.get("attention.layer_norm_rms_epsilon")),
            n_expert_shared=int(k.get("expert_shared_count", 0)),
            n_ff_shared=int(k.get("expert_feed_forward_length")) * int(k.get("expert_shared_count", 0)),
            expert_weights_norm=bool(k.get("expert_weights_norm", False)),
            # llama.cpp: files without the key (DeepSeek-V2/V2.5) are softmax
            expert_gating="sigmoid" if gating == 2 else "softmax",
            q_lora_rank=int(k.get("attention.q_lora_rank", 0)), kv_lora_rank=kv_lora, qk_rope_dim=rope_dim,
            v_head_dim=v_dim, mla_split=mla_split,
            n_layer_dense_lead=int(k.get("leading_dense_block_count", 0)),
            n_ff=int(k.get("feed_forward_length", 0)),
            expert_weights_scale=float(k.get("expert_weights_scale", 0.0)) or 1.0,
            n_expert_groups=n_groups, n_group_used=n_group_used,
            rope_scaling_factor=factor if factor > 1.0 else 1.0,
            rope_orig_ctx=int(k.get("rope.scaling.original_context_length", k.get("context_length"))),
            rope_yarn_log_mul=float(k.get("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1,
            rope_attn_factor=float(k.get("rope.scaling.attn_factor", 1.0)),
            yarn_beta_fast=float(k.get("rope.scaling.yarn_beta_fast", 32.0)),
            yarn_beta_slow=float(k.get("rope.scaling.yarn_beta_slow", 1.0)),
        )

CONFIGS: dict[str, type[ModelConfig]] = {c.arch: c for c in (Qwen3MoeConfig, LlamaMoeConfig, Deepseek2Config)}


def config_from_metadata(md: Mapping[str, Any]) -> ModelConfig:
    arch = str(md.get("general.architecture", "?"))
    cls = CONFIGS.get(arch)
    if cls is None:
        raise UnsupportedError(f"unsupported architecture {arch!r} (supported: {', '.join(sorted(CONFIGS))})")
    return cls.from_metadata(md)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int | float, total: int | None = None) -> int:
    """Bytes from ``123``, ``"512M"``, ``"8G"``, ``"1.5GiB"`` (binary units), or ``"10%"`` of ``total``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise BudgetError(f"size {text} is negative")
        return int(text)
    s = str(text).strip()
    if s.endswith("%"):
        if total is None:
            raise BudgetError(f"size {s!r}: a percentage needs a total to be a share of")
        try:
            pct = float(s[:-1])
        except ValueError:
            raise BudgetError(f"size {s!r} is not a number followed by %") from None
        if not 0 <= pct <= 100:
            raise BudgetError(f"size {s!r}: a percentage must be within 0..100")
        return int(total * pct / 100)
    m = _SIZE_RE.match(s)
    if not m:
        raise BudgetError(f"size {s!r} not understood: use bytes or a number with K, M, G or T (e.g. 8G, 512M)")
    return int(float(m[1]) * _UNITS[m[2].upper()])


def format_size(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
