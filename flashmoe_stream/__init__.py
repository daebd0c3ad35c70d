"""flashmoe-stream: run Mixture-of-Experts LLMs larger than RAM by streaming experts from NVMe."""

from .config import ModelConfig, parse_size
from .errors import BadFileError, BudgetError, FlashMoeError, UnsupportedError
from .gguf_file import GGUFModel, TensorInfo, open_gguf

__version__ = "0.1.0"
__all__ = [
    "BadFileError", "BudgetError", "FlashMoeError", "GGUFModel", "ModelConfig", "TensorInfo",
    "UnsupportedError", "open_gguf", "parse_size",
]
