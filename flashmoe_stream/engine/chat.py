"""Chat templates: the Jinja template a GGUF carries in ``tokenizer.chat_template``, rendered in a sandbox."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import FlashMoeError, UnsupportedError


class NoChatTemplateError(UnsupportedError):
    """The model file carries no chat template (use plain completion, or give a template)."""


class ChatTemplateError(FlashMoeError):
    """A chat template that does not compile, or that refused the conversation (``raise_exception``)."""


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template. ``render(messages)`` gives the prompt text (special tokens written out)."""

    def __init__(self, template_str: str, bos_token: str = "", eos_token: str = ""):
        self.source = template_str
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(template_str)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not compile ({e}); "
                                    "fix it or pass another template") from None

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], name: str | None = None) -> ChatTemplate:
        """The template in GGUF metadata (``tokenizer.chat_template``, or ``tokenizer.chat_template.<name>``)."""
        key = "tokenizer.chat_template" + (f".{name}" if name else "")
        source = md.get(key)
        if not source:
            what = f"a chat template named {name!r}" if name else "a chat template"
            raise NoChatTemplateError(f"the model has no {what} ({key} is missing); "
                                      "use plain completion or supply a template")
        tokens = md.get("tokenizer.ggml.tokens")

        def text(key: str) -> str:
            i = md.get(key)
            if tokens is None or i is None or not 0 <= int(i) < len(tokens):
                return ""
            return str(tokens[int(i)])

        return cls(str(source), text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id"))

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt for ``messages`` (dicts with ``role`` and ``content``); extra keyword
        arguments (``tools=...``, ``enable_thinking=...``) are passed to the template."""
        try:
            return self._template.render(messages=[dict(m) for m in messages], bos_token=self.bos_token,
                                         eos_token=self.eos_token, add_generation_prompt=add_generation_prompt,
                                         **kwargs)
        except _TemplateRaised as e:
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed to render ({type(e).__name__}: {e}); "
                                    "check the messages or supply another template") from None
