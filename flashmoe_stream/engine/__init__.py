"""Engine: tokenizer and chat template (generation comes later). The public surface is what this file exports."""

from .chat import ChatTemplate, ChatTemplateError, NoChatTemplateError
from .tokenizer import Tokenizer

__all__ = ["ChatTemplate", "ChatTemplateError", "NoChatTemplateError", "Tokenizer"]
