"""Prompt templates: LoRA-Pro's Alpaca prompt (no input field) and a tokenizer's own chat template.

    format_prompt("What is 2+2?", tokenizer, "alpaca")  # ALPACA_PROMPT with the query filled in
    format_prompt("What is 2+2?", tokenizer, "chat")    # tokenizer.apply_chat_template(user turn) + generation prompt

A training example is prompt + answer part, where the answer part is " " + answer + eos (alpaca, as LoRA-Pro's
`x + " " + y + eos_token`) or the assistant turn as the chat template renders it, up to and including the eos
token that closes it (chat). `answer_part` returns that text; the eos of the alpaca template is added as an id.
"""
from __future__ import annotations

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{query}\n\n### Response:\n")
TEMPLATES = ("alpaca", "chat")


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(f"template 'chat' needs a tokenizer with a chat template; {name!r} has none "
                         "(use template 'alpaca')")


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):  # some versions return a one-element list for a single conversation
        text = text[0]
    return text


def format_prompt(query: str, tokenizer=None, template: str = "alpaca") -> str:
    """The text the model sees before its answer (str)."""
    check_template(template)
    if template == "alpaca":
        return ALPACA_PROMPT.format(query=query)
    require_chat_template(tokenizer)
    return render_chat(tokenizer, [{"role": "user", "content": query}], generation_prompt=True)


def answer_part(query: str, answer: str, tokenizer, template: str, prompt: str) -> str:
    """The text after `prompt` that the loss is taken on: " " + answer (alpaca; eos is appended as an id by
    the caller) or the rendered assistant turn cut after its closing eos token (chat; a trailing newline the
    template adds after eos is not trained on)."""
    if template == "alpaca":
        return " " + answer
    full = render_chat(tokenizer, [{"role": "user", "content": query}, {"role": "assistant", "content": answer}],
                   generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the user turn differently with and without the assistant "
                         "turn; cannot separate prompt from answer")
    rest = full[len(prompt):]
    eos = tokenizer.eos_token
    cut = rest.rfind(eos) if eos else -1
    return rest[:cut + len(eos)] if cut >= 0 else rest
