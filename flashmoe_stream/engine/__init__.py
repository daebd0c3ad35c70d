"""Engine: a model opened for streaming generation, with its tokenizer, chat template and sampler.

    Engine.open(path, device, vram_cache, ram_cache, policy, prefetch) -> Engine
        .logits(ids) .generate(prompt, ...) .tokenize(text) .detokenize(ids) .stats() .close()
    Tokenizer.from_metadata(md) / ChatTemplate.from_metadata(md) / SamplingParams
"""

from .chat import ChatTemplate, ChatTemplateError, NoChatTemplateError
from .engine import Engine
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["ChatTemplate", "ChatTemplateError", "Engine", "NoChatTemplateError", "SamplingParams", "Tokenizer"]
