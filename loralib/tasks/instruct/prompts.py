"""Prompt templates: LoRA-Pro's Alpaca prompt (no input field) and a tokenizer's own chat template.

    format_prompt("What is 2+2?", tokenizer, "alpaca")  # ALPACA_PROMPT with the query filled in
    format_prompt("What is 2+2?", tokenizer, "chat")    # tokenizer.apply_chat_template(user turn) + generation prompt

A training example is prompt + answer part, where the answer part is " " + answer + eos (alpaca, as LoRA-Pro's
`x + " " + y + eos_token`) or the assistant turn as the chat template renders it, up to and including the eos
token that closes it (chat). `answer_part` returns that text; the eos of the alpaca template is added as an id.

The released evaluation (`mode="released"` of evaluate_gsm8k / evaluate_humaneval), byte for byte from
github.com/mrflogs/LoRA-Pro: evaluation/eval_llama-2_math_multi_gpus.py at commit 26d4093 (`template_wo_input`,
our ALPACA_PROMPT, + " ") and evaluation/eval_llama-2_code_multi_gpus.py at commit 0ae2f42
(`ALPACA_PREFIX_TEMPLATE_MD` + " "). Both scripts called generate(max_new_tokens=512, top_p=0.95,
temperature=0.8) with no do_sample: transformers then samples when the model folder's generation_config.json
says do_sample (its top_k, default 50, applies too), else decodes greedily (`released_decoding`).
"""
from __future__ import annotations

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{query}\n\n### Response:\n")
TEMPLATES = ("alpaca", "chat")
EVAL_MODES = ("ours", "released")
RELEASED_GSM8K_PROMPT = ALPACA_PROMPT + " "  # the released script appends a space after "### Response:\n"
# The released HumanEval instruction (the "\n " after "task." and the space after "code:" are the script's).
RELEASED_HUMANEVAL_PROMPT = (
    "Below is an instruction that describes a task.\n Write a response that appropriately completes the request."
    "\n\n### Instruction:\nComplete the following Python code: \n"
    "Notes: respond with the entire complete function definition\n"
    "do not add any comments, be as concise in your code as possible\n"
    "use only built-in libraries, assume no additional imports other than those provided (if any)\n"
    "use `    ` (4 spaces) for each level of indentation\n\n"
    "code:\n```python\n{PROMPT}\n```\n\n### Response:\n```python\n") + " "
RELEASED_SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # the released scripts' generate() arguments


def check_eval_mode(mode: str) -> None:
    if mode not in EVAL_MODES:
        raise ValueError(f"evaluation mode must be one of {EVAL_MODES}, got {mode!r}")


def released_decoding(generation_config: dict | None) -> dict:
    """The released scripts' decoding as keyword arguments of loralib.models.generation.generate, given the
    model folder's generation_config.json (None or {} when it has none): sampling at temperature 0.8, top_p
    0.95 and the folder's top_k (transformers' default 50) if it sets do_sample, else greedy (transformers
    ignores temperature and top_p then)."""
    config = generation_config or {}
    if not config.get("do_sample", False):
        return {"do_sample": False}
    return {"do_sample": True, "top_k": int(config.get("top_k", 50) or 0), **RELEASED_SAMPLING}


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
