"""Prompt datasets: field mapping, answers from solutions, malformed rows, bundled sets, the synthetic task,
prompt rendering and the resumable order."""

from __future__ import annotations

import json

import pytest
import torch
from grading_helpers import gold_parses

from popo_megatron.config import load_config
from popo_megatron.data.datasets import load_dataset
from popo_megatron.data.problems import DataError, Fields, load_problems
from popo_megatron.data.prompts import render_prompt
from popo_megatron.data.sampler import PromptSampler
from popo_megatron.data.synthetic import VOCAB, ArithmeticTask, arithmetic_tokenizer, save_arithmetic_model
from popo_megatron.reward.extract import extract_answer
from popo_megatron.reward.pool import GradingPool


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_default_and_configured_fields(tmp_path):
    default = _jsonl(tmp_path / "a.jsonl", [{"problem": "1+1?", "answer": 2}, {"question": "2+2?", "answer": "4"}])
    problems = load_problems(default)
    assert [(p.problem, p.answer) for p in problems.problems] == [("1+1?", "2"), ("2+2?", "4")]
    assert problems[1].source == f"{default}:2"
    custom = _jsonl(tmp_path / "b.jsonl", [{"prompt": "3+3?", "final": "6", "answer": "wrong"}])
    assert load_problems(custom, Fields(problem="prompt", answer="final"))[0].answer == "6"


def test_answers_from_solutions(tmp_path):
    path = _jsonl(
        tmp_path / "s.jsonl",
        [{"problem": "p", "solution": r"First \boxed{1}. So the answer is $\boxed{\frac{a}{b^{2}}}$."}],
    )
    assert load_problems(path)[0].answer == r"\frac{a}{b^{2}}"


def test_parquet_with_renamed_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["x?", "y?"], "sol": [r"\boxed{3}", r"\boxed{4}"]}), path)
    problems = load_problems(path, Fields(solution="sol"))
    assert [p.answer for p in problems.problems] == ["3", "4"] and problems[1].source == f"{path}:row 1"


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"problem": "x", "answer": ', r"bad\.jsonl:2: not valid JSON"),
        ('["a list"]', r"bad\.jsonl:2: expected an object with a problem and an answer, got list"),
        ('{"prompt": "x", "answer": "1"}', r"bad\.jsonl:2: no 'problem or question' field .*set data\.problem_key"),
        ('{"problem": "  ", "answer": "1"}', r"bad\.jsonl:2: field 'problem' is empty"),
        ('{"problem": "x"}', r"bad\.jsonl:2: neither answer or solution field"),
        ('{"problem": "x", "solution": "no box"}', r"bad\.jsonl:2: field 'solution' has no \\boxed\{\} answer"),
        ('{"problem": "x", "answer": ""}', r"bad\.jsonl:2: field 'answer' is empty"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, row, {"problem": "ok2", "answer": "2"}])
    with pytest.raises(DataError, match=message):
        load_problems(path)
    skipped = load_problems(path, on_malformed="skip")
    assert [p.problem for p in skipped.problems] == ["ok", "ok2"], "skipping loses nothing else"
    assert sum(skipped.skipped.values()) == 1 and str(path) in skipped.skipped_examples[0]


def test_unusable_sources(tmp_path):
    with pytest.raises(DataError, match="no such dataset file"):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unsupported format '.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_problems(tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"no usable problems \(skipped: \{'invalid_json': 1\}\)"):
        load_problems(_jsonl(tmp_path / "all_bad.jsonl", ["{"]), on_malformed="skip")


def test_bundled_sets_have_parseable_answers():
    cfg = load_config(overrides=["model.hf_path=/x"])
    math500, train = load_dataset(cfg.data, "math500"), load_dataset(cfg.data, "math_train_slice")
    assert len(math500) == 500 and len(train) == 500
    golds = [p.answer for p in math500.problems + train.problems]
    with GradingPool(gold_parses, None, workers=2, timeout_s=10) as pool:
        grades = pool.map([(g,) for g in golds])
    bad = [g.answer for g in grades if not g.correct]
    assert not bad, f"{len(bad)} bundled answers do not parse, e.g. {bad[:3]}"


def test_synthetic_task_is_deterministic_and_correct():
    from dataclasses import replace

    task = ArithmeticTask(size=300, max_operand=9, operands=3, operations="+-*", seed=5)
    problems = task.problems()
    assert len(problems) == 300
    assert problems.problems == replace(task).problems().problems
    assert problems.problems != replace(task, seed=6).problems().problems
    for p in problems.problems:
        # An independent evaluation: multiplications first, then + and - from left to right.
        terms, signs, current = [], [1], p.problem.rstrip("=")
        for token in current.replace("-", " - ").replace("+", " + ").split():
            if token in "+-":
                signs.append(1 if token == "+" else -1)
            else:
                product = 1
                for factor in token.split("*"):
                    product *= int(factor)
                terms.append(product)
        assert sum(s * t for s, t in zip(signs, terms, strict=True)) == int(p.answer), p
    easy = ArithmeticTask(max_operand=2).problems()
    assert max(int(p.answer) for p in easy.problems) <= 4, "the difficulty knobs bound the answers"


def test_synthetic_splits_are_disjoint_and_cover_the_task():
    """Every a+b with a, b in 0..19 is in exactly one split; about one in five is held out; a problem's split
    does not depend on the order, the size cap or the other problems; the held-out split is not guessable."""
    task = ArithmeticTask()  # the defaults: the embedded default's task
    train, heldout = task.problems("train"), task.problems("heldout")
    train_texts, heldout_texts = {p.problem for p in train.problems}, {p.problem for p in heldout.problems}
    everything = {f"{a}+{b}=" for a in range(20) for b in range(20)}
    assert not train_texts & heldout_texts
    assert train_texts | heldout_texts == everything and len(train) + len(heldout) == task.count() == 400
    assert 0.12 < len(heldout) / 400 < 0.28
    capped = ArithmeticTask(size=50, seed=3).problems("heldout")
    assert {p.problem for p in capped.problems} <= heldout_texts and len(capped) == 50
    wider = {p.problem for p in ArithmeticTask(max_operand=29).problems("heldout").problems}
    assert heldout_texts == wider & everything, "widening the range moves no problem between splits"
    # The best answer given without reading the problem, computed independently of ProblemSet's method.
    sums = [int(t.split("+")[0]) + int(t.split("+")[1].rstrip("=")) for t in heldout_texts]
    best = max(sums.count(v) for v in set(sums)) / len(sums)
    assert heldout.prompt_blind_accuracy() == pytest.approx(best) and best <= 0.25
    cfg = load_config(overrides=["model.hf_path=/x"])
    assert [p.problem for p in load_dataset(cfg.data, "synthetic:heldout").problems] == [
        p.problem for p in heldout.problems
    ]
    with pytest.raises(ValueError, match="synthetic:test: unknown split"):
        load_dataset(cfg.data, "synthetic:test")


def test_arithmetic_tokenizer_round_trip():
    tokenizer = arithmetic_tokenizer()
    assert len(tokenizer) == len(VOCAB) == 16
    ids = tokenizer.encode("12*3-4=", add_special_tokens=False)
    assert len(ids) == 7 and tokenizer.decode(ids) == "12*3-4="
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == "12*3-4="


def test_random_tiny_model_sometimes_answers_the_synthetic_task(tmp_path):
    """The embedded default's premise: graded strictly (the answer's digits and nothing else, within the
    main job's 2 tokens), a random model on the 16-token task is right now and then, rarely."""
    from transformers import AutoModelForCausalLM

    path = save_arithmetic_model(tmp_path / "arith", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = arithmetic_tokenizer()
    problems = ArithmeticTask(size=64).problems().problems
    torch.manual_seed(0)
    correct = samples = 0
    for p in problems:
        prompt = torch.tensor([render_prompt(p.problem, tokenizer, None, "")])
        out = model.generate(prompt, do_sample=True, max_new_tokens=2, num_return_sequences=64, pad_token_id=0)
        for row in out[:, prompt.shape[1] :]:
            found = extract_answer(tokenizer.decode(row, skip_special_tokens=True), ["only_number"])
            correct += found is not None and int(found.answer) == int(p.answer)
            samples += 1
    rate = correct / samples
    assert 0.0005 < rate < 0.05, f"success rate of a random model: {rate:.4f}"


def test_prompt_rendering():
    tokenizer = arithmetic_tokenizer()
    assert tokenizer.decode(render_prompt("1+2", tokenizer, None, "ignored")) == "1+2", "no chat template: bare"
    assert tokenizer.decode(render_prompt("1+2", tokenizer, "{problem}=", "ignored")) == "1+2="
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    assert tokenizer.decode(render_prompt("1+2", tokenizer, None, "")) == "1+2="
    with pytest.raises(ValueError, match=r"must contain \{problem\}"):
        render_prompt("1+2", tokenizer, "no placeholder", "")


def test_sampler_resumes_exactly():
    reference = PromptSampler(10, seed=3)
    full = reference.next_indices(25)
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10)), "each epoch a permutation"
    assert full[:10] != full[10:20], "a new shuffle per epoch"
    first = PromptSampler(10, seed=3)
    head = first.next_indices(13)
    resumed = PromptSampler(10, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert head + resumed.next_indices(12) == full
    assert PromptSampler(10, seed=4).next_indices(10) != full[:10]
    with pytest.raises(ValueError, match="does not fit this one"):
        PromptSampler(11, seed=3).load_state_dict(first.state_dict())


def test_prompts_the_engines_context_cannot_hold_are_left_out_counted_and_named(tmp_path, caplog):
    from popo_megatron.data.prompts import TOO_LONG, drop_over_long, fits_context

    tokenizer = arithmetic_tokenizer()  # one token per character: a prompt's length is its text's
    rows = [{"problem": "1+2=", "answer": 3}, {"problem": "11+22+33=", "answer": 66}, {"problem": "4+4=", "answer": 8}]
    problems = load_problems(_jsonl(tmp_path / "p.jsonl", rows))
    data = load_config(overrides=["model.hf_path=unused"]).data
    lengths = [len(render_prompt(p.problem, tokenizer, data.prompt_template, data.instruction)) for p in problems]
    context = lengths[1]  # the second prompt fills the context: no room for a response
    assert lengths[0] < context and lengths[2] < context
    assert fits_context([0] * (context - 1), context) and not fits_context([0] * context, context)
    with caplog.at_level("WARNING", logger="popo.data"):
        kept = drop_over_long(problems, tokenizer, data, context)
    assert [p.answer for p in kept] == ["3", "8"] and kept.skipped[TOO_LONG] == 1
    assert f"p.jsonl:2 ({context} tokens)" in caplog.text and "1 of 3 problem(s)" in caplog.text
    assert drop_over_long(problems, tokenizer, data, context + 1) is problems  # all fit: nothing changes
    with pytest.raises(DataError, match="none is left: raise rollout.max_model_len"):
        drop_over_long(problems, tokenizer, data, min(lengths))


def test_a_packing_budget_below_the_longest_prompt_and_response_is_refused_before_a_step(tmp_path):
    from popo_megatron.data.prompts import check_packing_budget
    from popo_megatron.errors import UserError

    tokenizer = arithmetic_tokenizer()
    rows = [{"problem": "1+2=", "answer": 3}, {"problem": "11+22+33=", "answer": 66}]
    problems = load_problems(_jsonl(tmp_path / "p.jsonl", rows))
    data = load_config(overrides=["model.hf_path=unused"]).data
    longest = max(len(render_prompt(p.problem, tokenizer, data.prompt_template, data.instruction)) for p in problems)
    check_packing_budget(problems, tokenizer, data, max_tokens=8, budget=longest + 8)  # the longest fits exactly
    with pytest.raises(UserError, match=rf"train.max_tokens_per_microbatch={longest + 7} .* at least {longest + 8}"):
        check_packing_budget(problems, tokenizer, data, max_tokens=8, budget=longest + 7)
