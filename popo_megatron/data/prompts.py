"""Problems -> prompt token ids: a template string from the config, or the tokenizer's chat template.

data.prompt_template set   "{problem}" in it is replaced by the problem text
else, a chat template      one user turn: problem + data.instruction, then the assistant prefix
else                       the problem text alone (e.g. the synthetic task's character tokenizer)
"""

from __future__ import annotations

from typing import Any

from popo_megatron.errors import UserError

PLACEHOLDER = "{problem}"


def render_prompt(problem: str, tokenizer: Any, template: str | None, instruction: str) -> list[int]:
    """The prompt's token ids for the rollout engine."""
    if template is not None:
        if PLACEHOLDER not in template:
            raise UserError(f"data.prompt_template must contain {PLACEHOLDER}: {template!r}")
        return tokenizer.encode(template.replace(PLACEHOLDER, problem), add_special_tokens=False)
    if getattr(tokenizer, "chat_template", None):
        content = f"{problem}\n{instruction}" if instruction else problem
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer.encode(problem, add_special_tokens=False)
