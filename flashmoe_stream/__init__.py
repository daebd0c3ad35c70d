"""flashmoe-stream: run Mixture-of-Experts LLMs larger than RAM by streaming experts from NVMe."""

from .config import ModelConfig, parse_size
from .errors import BadFileError, BudgetError, FlashMoeError, UnsupportedError
from .gguf_file import GGUFModel, TensorInfo, open_gguf

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Engine":  # imported on first use: it pulls in torch
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'flashmoe_stream' has no attribute {name!r}")


__all__ = [
    "BadFileError", "BudgetError", "Engine", "FlashMoeError", "GGUFModel", "ModelConfig", "TensorInfo",
    "UnsupportedError", "open_gguf", "parse_size",
]
