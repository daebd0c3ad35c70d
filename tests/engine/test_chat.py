"""Chat templates from GGUF metadata."""

import pytest

from flashmoe_stream.engine import ChatTemplate, ChatTemplateError, NoChatTemplateError, Tokenizer
from flashmoe_stream.errors import FlashMoeError
from flashmoe_stream.gguf_file import open_gguf

MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "What's AI?"}]
EXPECTED = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat's AI?<|im_end|>\n"


@pytest.mark.parametrize("arch", ["qwen3moe", "llama"])
def test_chatml_from_gguf(make_model, arch):
    md = open_gguf(make_model(arch, "Q8_0")).metadata
    tpl = ChatTemplate.from_metadata(md)
    assert tpl.render(MESSAGES) == EXPECTED + "<|im_start|>assistant\n"
    assert tpl.render(MESSAGES, add_generation_prompt=False) == EXPECTED
    assert tpl.bos_token == "<|endoftext|>" and tpl.eos_token == "<|im_end|>"
    # the rendered prompt's special tokens become single tokens
    tok = Tokenizer.from_metadata(md)
    ids = tok.encode(tpl.render(MESSAGES), add_bos=False)
    assert ids[0] == md["tokenizer.ggml.tokens"].index("<|im_start|>")


def test_no_chat_template():
    with pytest.raises(NoChatTemplateError, match="plain completion"):
        ChatTemplate.from_metadata({"tokenizer.ggml.tokens": ["a"]})
    assert issubclass(NoChatTemplateError, FlashMoeError)


def test_template_features():
    src = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
           "{{ raise_exception('roles must be user or assistant') }}{% endif %}"
           "[{{ m['role'] }}]{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}")
    tpl = ChatTemplate(src, bos_token="<s>", eos_token="</s>")
    assert tpl.render([{"role": "user", "content": "héllo"}]) == '<s>[user]"héllo"</s>'
    with pytest.raises(ChatTemplateError, match="roles must be"):
        tpl.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_template_is_sandboxed():
    tpl = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        tpl.render(MESSAGES)
