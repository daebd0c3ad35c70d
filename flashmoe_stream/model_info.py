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
