"""Problems -> prompt token ids: a template string from the config, or the tokenizer's chat template.

data.prompt_template set   "{problem}" in it is replaced by the problem text
else, a chat template      one user turn: problem + data.instruction, then the assistant prefix
else                       the problem text alone (e.g. the synthetic task's character tokenizer)

A prompt the rollout engine's context cannot hold with a response would make vLLM refuse the whole batch
mid-run: such problems are left out when the data loads, counted and named (drop_over_long).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any, Sequence

from popo_megatron.data.problems import DataError, ProblemSet
from popo_megatron.errors import UserError
from popo_megatron.logs import get_logger

PLACEHOLDER = "{problem}"
log = get_logger("data")


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


TOO_LONG = "prompt_too_long"


def engine_context(rollout_cfg: Any, max_position_embeddings: int) -> int:
    """The rollout engine's context in tokens, prompt and response together: rollout.max_model_len, else the
    model's max_position_embeddings (what vLLM derives for the architectures we support)."""
    return rollout_cfg.max_model_len or max_position_embeddings


def fits_context(prompt_ids: Sequence[int], context: int) -> bool:
    """Whether the engine takes the prompt and has room for at least one response token (a longer prompt
    makes vLLM raise for the whole batch)."""
    return len(prompt_ids) < context


def drop_over_long(problems: ProblemSet, tokenizer: Any, data_cfg: Any, context: int) -> ProblemSet:
    """`problems` without those whose prompt does not fit the engine's context, counted in `skipped` (reason
    prompt_too_long) and named on the console (the first few). Raises DataError when none fits."""
    kept, dropped = [], []
    for problem in problems.problems:
        prompt = render_prompt(problem.problem, tokenizer, data_cfg.prompt_template, data_cfg.instruction)
        (kept if fits_context(prompt, context) else dropped).append((problem, len(prompt)))
    if not dropped:
        return problems
    named = ", ".join(f"{p.source} ({n} tokens)" for p, n in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
    why = (
        f"{problems.name}: {len(dropped)} of {len(problems)} problem(s) have a prompt of at least the engine's "
        f"context ({context} tokens: rollout.max_model_len, else the model's max_position_embeddings): {named}"
    )
    if not kept:
        raise DataError(f"{why}; none is left: raise rollout.max_model_len or shorten the prompts", TOO_LONG)
    log.warning(f"{why}; they are left out")
    skipped = problems.skipped + Counter({TOO_LONG: len(dropped)})
    examples = problems.skipped_examples + [f"{p.source}: prompt of {n} tokens" for p, n in dropped[:5]]
    return replace(problems, problems=[p for p, _ in kept], skipped=skipped, skipped_examples=examples)


def check_packing_budget(problems: ProblemSet, tokenizer: Any, data_cfg: Any, max_tokens: int, budget: int) -> None:
    """Refuse, before any step, a packing budget (train.max_tokens_per_microbatch) below the longest sequence a
    step can hold: the longest prompt plus rollout.max_tokens (a step would stop at its first such rollout)."""
    longest = max(
        (
            len(render_prompt(p.problem, tokenizer, data_cfg.prompt_template, data_cfg.instruction))
            for p in problems.problems
        ),
        default=0,
    )
    if longest + max_tokens > budget:
        raise UserError(
            f"train.max_tokens_per_microbatch={budget} is less than the longest sequence a step can hold: "
            f"{longest + max_tokens} tokens (the longest prompt of {problems.name}, {longest} tokens, + "
            f"rollout.max_tokens={max_tokens}): raise it to at least {longest + max_tokens}, or lower "
            "rollout.max_tokens"
        )
