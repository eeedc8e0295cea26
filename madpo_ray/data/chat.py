"""Chat prompts rendered with the model's own template, remembering which parts are message content.

Training (data/collate.py) and serving (serving/engine.py) render chats the same way: message
content is then tokenised with special tokens split (a typed "<|eos|>" is text), the template's own
markup with special tokens recognised. Lives in the data layer so that training never imports serving.
"""

from __future__ import annotations

import re
from typing import Optional


class ClientInputError(ValueError):
    """A request the engine cannot serve as sent (e.g. a chat longer than the context): a 400."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class NoChatTemplate(ClientInputError):
    """The model has no chat template: the chat route is not implemented for it (501)."""


class ChatPrompt(str):
    """A rendered chat: the text, plus which parts are user-supplied message content.

    Message content is tokenised with special tokens split (typed "<|eos|>" is text), the
    template's own markup with special tokens recognised."""

    segments: list[tuple[str, bool]]


SENTINEL = re.compile("\ue000(\\d+)\ue001")


def apply_template(tokenizer, messages: list[dict]) -> str:
    """The chat as the model's template renders it. A template that refuses the messages (a strict
    role order, no system role) is the client's 400; a model without a template, a 501."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("this model has no chat template; send a plain prompt to /v1/completions instead",
                             param="messages")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, TypeError, KeyError, IndexError, ValueError) as e:
        raise ClientInputError(f"the model's chat template cannot render these messages: {e}",
                               param="messages") from None


def render_chat(tokenizer, messages: list[dict]) -> ChatPrompt:
    """Render with placeholders, then put the content back as separately marked segments."""
    marked = [dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)]
    text = apply_template(tokenizer, marked)
    parts = SENTINEL.split(text)
    if len(parts) != 2 * len(messages) + 1:  # a template that alters content: treat it all as user text
        plain = apply_template(tokenizer, messages)
        prompt = ChatPrompt(plain)
        prompt.segments = [(plain, True)]
        return prompt
    segments = [(parts[j], False) if j % 2 == 0 else (messages[int(parts[j])]["content"], True)
                for j in range(len(parts))]
    prompt = ChatPrompt("".join(s for s, _ in segments))
    prompt.segments = segments
    return prompt
