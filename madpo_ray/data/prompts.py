"""How a document becomes a prompt: `data.prompt_template`, optionally as one user message of the
model's chat template (`data.chat: true`, for instruction-tuned models such as SmolLM2-Instruct).

Training rows carry the message list (collate renders it, keeping the template's markup special
and the document's text plain); generation gets the rendered text (`generation_prompts`); the
served model's madpo.json gets the rendered template (`effective_prompt_template`)."""

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


def prompt_for(data_cfg, document: str):
    """A training prompt: the formatted template, or (data.chat) a one-user-message conversation."""
    text = data_cfg.prompt_template.format(document=document)
    return [{"role": "user", "content": text}] if data_cfg.chat else text


def generation_prompts(data_cfg, tokenizer, documents: list[str]) -> list[str]:
    """Prompts to generate from, rendered exactly as training tokenises them."""
    from madpo_ray.data.collate import prompt_text

    return [prompt_text(tokenizer, prompt_for(data_cfg, d)) for d in documents]
