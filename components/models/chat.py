"""Chat templates: how a prompt becomes the text a model reads, the same in every stage.

A tokenizer with a chat template (an instruct checkpoint's) gets each prompt as one user message, rendered with the
assistant's turn opened (`add_generation_prompt`); the response follows it and ends with the tokenizer's EOS (an
instruct tokenizer's EOS is its end-of-turn token, `<|im_end|>`, `<|eot_id|>`). A tokenizer without one (a base
model's, the demo's) reads the prompt as it is and the response after a space.

Used where text becomes tokens: SFT's examples (TRL's conversational format, which TRL renders with the same
template), the reward model's `encode`, PPO's and evaluation's prompts (`generation.encode_prompts`), and the served
model (components/registry/policy_model.py repeats `render_prompt`: the served file stands alone). `model.chat_template=false`
drops a tokenizer's template when it is loaded (`loading.load_tokenizer`), so the stages never see it.
"""

from __future__ import annotations


def uses_template(tok) -> bool:
    """Whether prompts are rendered with `tok`'s chat template (it has one)."""
    return bool(getattr(tok, "chat_template", None))


def render_prompt(tok, prompt: str) -> str:
    """The text a prompt is tokenized as: the user message with the assistant's turn opened, or the prompt itself."""
    if not uses_template(tok):
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def prompt_and_response(tok, prompt: str, response: str) -> str:
    """prompt + response as one text (EOS not included): rendered prompt + response, or prompt + " " + response."""
    if not uses_template(tok):
        return f"{prompt} {response}"
    return render_prompt(tok, prompt) + response


def conversation(example: dict) -> dict:
    """An SFT example {"prompt", "completion"} in TRL's conversational prompt-completion format (TRL renders it with
    the tokenizer's template; the loss stays on the completion)."""
    return {
        "prompt": [{"role": "user", "content": example["prompt"]}],
        "completion": [{"role": "assistant", "content": example["completion"].strip()}],
    }
