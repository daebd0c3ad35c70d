"""Forward passes of the supported MoE families. No files, no threads: dense weights come in as
tensors keyed by GGUF name, routed experts from an ExpertSource (the cache).
"""

from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import UnsupportedError
from .base import StreamingDecoder
from .common import ExpertSource, KVCache
from .decoder import MoEDecoder
from .deepseek2 import Deepseek2Decoder, MLAKVCache

ARCHITECTURES = ("deepseek2", "llama", "qwen3moe")
_DECODERS = {"deepseek2": Deepseek2Decoder}


def build_model(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], experts: ExpertSource,
                prefetch: bool = True, weight_types: Mapping | None = None) -> StreamingDecoder:
    if cfg.arch not in ARCHITECTURES:
        raise UnsupportedError(f"no forward pass for architecture {cfg.arch!r} (supported: {', '.join(ARCHITECTURES)})")
    return _DECODERS.get(cfg.arch, MoEDecoder)(cfg, weights, experts, prefetch, weight_types)


__all__ = ["ARCHITECTURES", "Deepseek2Decoder", "ExpertSource", "KVCache", "MLAKVCache", "MoEDecoder",
           "StreamingDecoder", "build_model"]
