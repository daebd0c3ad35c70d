"""Engine: a model opened for streaming generation, with its tokenizer, chat template and sampler.

    Engine.open(path, device, vram_cache, ram_cache, policy, prefetch) -> Engine
        .logits(ids) .generate(prompt, ...) .tokenize(text) .detokenize(ids) .stats() .close()
    Tokenizer.from_metadata(md) / ChatTemplate.from_metadata(md) / SamplingParams
    Scheduler(model, tokenizer, n_slots, n_ctx).start() .submit(ids, max_tokens, params, emit) .stats() .close()
        several sequences decoded together by one thread (batching slots; events Piece/Finished/Failed)
"""

from .chat import ChatTemplate, ChatTemplateError, NoChatTemplateError
from .engine import Engine
from .sampling import SamplingParams
from .slots import Failed, Finished, Handle, Piece, PromptTooLongError, QueueFullError, Scheduler
from .tokenizer import Tokenizer

__all__ = ["ChatTemplate", "ChatTemplateError", "Engine", "Failed", "Finished", "Handle", "NoChatTemplateError", "Piece",
           "PromptTooLongError", "QueueFullError", "SamplingParams", "Scheduler", "Tokenizer"]
