"""What a model costs to stream: parameters, expert and dense bytes, bytes per token at 0 % cache hits."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .gguf_file import GGUFModel

_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.(weight|bias)$")


def expert_tensor_layer(name: str) -> int | None:
    """The layer of a routed-expert tensor (``blk.N.ffn_{gate,up,down}_exps.*``), else None."""
    m = _EXPERT_RE.match(name)
    return int(m[1]) if m else None


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    n_layer: int
    n_moe_layer: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    params_total: int
    params_active: int
    bytes_total: int
    bytes_dense: int
    bytes_experts: int
    bytes_per_expert: int  # largest over layers (layers may differ in quant type)
    bytes_per_expert_by_layer: dict[int, int]
    bytes_per_token_cold: int  # routed-expert bytes one token reads when no expert is cached
    files: list[str]

    @classmethod
    def of(cls, model: GGUFModel) -> "ModelInfo":
        cfg = model.config
        per_layer_bytes: dict[int, int] = {}
        per_layer_params: dict[int, int] = {}
        dense_bytes = dense_params = 0
        for t in model.tensors.values():
            layer = expert_tensor_layer(t.name)
            if layer is None:
                dense_bytes += t.nbytes
                dense_params += t.n_elements
            else:
                per_layer_bytes[layer] = per_layer_bytes.get(layer, 0) + t.nbytes
                per_layer_params[layer] = per_layer_params.get(layer, 0) + t.n_elements
        n = cfg.n_expert
        by_layer = {i: b // n for i, b in sorted(per_layer_bytes.items())}
        expert_params = sum(per_layer_params.values())
        return cls(
            arch=cfg.arch, n_layer=cfg.n_layer, n_moe_layer=len(by_layer), n_expert=n,
            n_expert_used=cfg.n_expert_used, n_expert_shared=cfg.n_expert_shared,
            params_total=dense_params + expert_params,
            params_active=dense_params + sum(p // n for p in per_layer_params.values()) * cfg.n_expert_used,
            bytes_total=model.nbytes, bytes_dense=dense_bytes, bytes_experts=sum(per_layer_bytes.values()),
            bytes_per_expert=max(by_layer.values(), default=0), bytes_per_expert_by_layer=by_layer,
            bytes_per_token_cold=sum(by_layer.values()) * cfg.n_expert_used,
            files=[str(p) for p in model.paths],
        )

    def as_dict(self) -> dict:
        return asdict(self)

    def plan(self, disk_gb_per_s: float, tok_s: float) -> dict:
        """The expert cache a target decode speed needs on a disk of ``disk_gb_per_s`` (GB/s, 1e9 bytes).

        Model: decode is bound by the routed-expert bytes read from disk per token; a token needs
        ``bytes_per_token_cold`` (k experts in every MoE layer) and a cache hit saves the read, so
        miss bytes per token = bytes_per_token_cold × (1 − hit rate). Assumption: routing spreads
        evenly over a layer's experts, so a cache holding a share s of the expert bytes hits with
        probability s (real routing is skewed, so this is the pessimistic end). Then
        tok/s = disk bandwidth / (bytes_per_token_cold × (1 − s)), and the target needs
        s ≥ 1 − bandwidth / (tok_s × bytes_per_token_cold). Dense weights stay resident on top.
        """
        if disk_gb_per_s <= 0 or tok_s <= 0:
            raise ValueError("disk bandwidth and tok/s must be positive")
        bw = disk_gb_per_s * 1e9
        cold = self.bytes_per_token_cold
        share = min(1.0, max(0.0, 1.0 - bw / (tok_s * cold))) if cold else 0.0
        cache = int(round(share * self.bytes_experts))
        return {
            "disk_gb_per_s": disk_gb_per_s, "tok_s": tok_s,
            "tok_s_at_0pct_hits": bw / cold if cold else float("inf"),
            "hit_rate_needed": share,
            "miss_bytes_per_token": int(cold * (1.0 - share)),
            "expert_cache_bytes": cache,
            "dense_bytes": self.bytes_dense,
            "memory_bytes": self.bytes_dense + cache,
        }
