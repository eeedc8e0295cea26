"""How a document becomes a prompt: `data.prompt_template`, optionally wrapped in the model's chat
template (`data.chat: true`, for instruction-tuned models such as SmolLM2-Instruct).

The chat-wrapped result is itself a format string with one `{document}` field, so every place that
builds prompts (SFT rows, testbed pairs, generation, evaluation, the served model's madpo.json)
formats it the same way."""

from __future__ import annotations

SENTINEL = "\x00document\x00"


def effective_prompt_template(data_cfg, tokenizer=None) -> str:
    """data.prompt_template, or (data.chat) the chat-template rendering of one user turn holding it."""
    if not data_cfg.chat:
        return data_cfg.prompt_template
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.chat is set but the tokenizer has no chat template")
    user = data_cfg.prompt_template.replace("{document}", SENTINEL)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return rendered.replace("{", "{{").replace("}", "}}").replace(SENTINEL, "{document}")


def render_prompts(template: str, documents: list[str]) -> list[str]:
    return [template.format(document=d) for d in documents]
