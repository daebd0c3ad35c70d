"""Forward passes of the supported MoE families. No files, no threads: dense weights come in as
tensors keyed by GGUF name, routed experts from an ExpertSource (the cache).
"""

from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import UnsupportedError
from .common import ExpertSource, KVCache
from .decoder import MoEDecoder

ARCHITECTURES = ("llama", "qwen3moe")


def build_model(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], experts: ExpertSource,
                prefetch: bool = True, weight_types: Mapping | None = None) -> MoEDecoder:
    if cfg.arch not in ARCHITECTURES:
        raise UnsupportedError(f"no forward pass for architecture {cfg.arch!r} (supported: {', '.join(ARCHITECTURES)})")
    return MoEDecoder(cfg, weights, experts, prefetch, weight_types)


__all__ = ["ARCHITECTURES", "ExpertSource", "KVCache", "MoEDecoder", "build_model"]
