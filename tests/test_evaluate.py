"""The evaluation primitive: k samples per problem from a real vLLM engine on a popo checkpoint, avg@k and pass@k
checked against an independent re-grading of the recorded responses."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from popo_megatron.evaluate import hf_model_dir, pass_at_k
from popo_megatron.launch import run_local

K = 4


@pytest.mark.parametrize("n, correct, k", [(4, 0, 4), (4, 1, 4), (5, 2, 3), (6, 3, 2), (3, 3, 1)])
def test_pass_at_k_matches_enumeration(n, correct, k):
    samples = [True] * correct + [False] * (n - correct)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, correct, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError, match="needs at least"):
        pass_at_k(2, 1, 3)


def _eval_worker(ckpt: str, out: str) -> None:
    from transformers import AutoTokenizer

    from popo_megatron.config import load_config
    from popo_megatron.data.datasets import load_dataset
    from popo_megatron.data.prompts import render_prompt
    from popo_megatron.evaluate import evaluate
    from popo_megatron.reward.math_verifier import MathVerifier
    from popo_megatron.rollout.engine import SamplingSettings
    from popo_megatron.rollout.vllm_engine import vllm_engine

    cfg = load_config(
        overrides=[
            f"model.hf_path={ckpt}",
            "data.synthetic.size=48",
            "reward.answer_fallbacks=[last_number]",
            "reward.workers=1",
            "rollout.max_tokens=4",
            "rollout.max_model_len=32",
            "rollout.kv_cache_memory_mb=16",
        ]
    )
    with hf_model_dir(ckpt) as model_dir:
        engine = vllm_engine(cfg, model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    verifier = MathVerifier(cfg.reward)
    try:
        problems = load_dataset(cfg.data)
        sampling = SamplingSettings.from_config(cfg.rollout)
        result = evaluate(engine, problems, tokenizer, verifier, cfg.data, sampling, K, batch_prompts=20)
        # A context the longer half of the first problems' prompts do not fit: scored 0, never sent to vLLM.
        few = replace(problems, problems=problems.problems[:8])
        lengths = sorted(
            len(render_prompt(p.problem, tokenizer, cfg.data.prompt_template, cfg.data.instruction)) for p in few
        )
        cut = evaluate(engine, few, tokenizer, verifier, cfg.data, sampling, K, context=lengths[4], progress=False)
    finally:
        verifier.close()
        engine.shutdown()
    result.write(Path(out))
    cut.write(Path(out).with_name("cut.json"))


def test_evaluate_a_checkpoint(tmp_path):
    from popo_megatron.convert.offline import hf_to_mcore
    from popo_megatron.data.synthetic import save_arithmetic_model

    hf = save_arithmetic_model(tmp_path / "hf", seed=1)
    with hf_model_dir(hf) as model_dir:
        assert model_dir == hf, "an HF directory is used as it is"
    hf_to_mcore(hf, tmp_path / "ckpt", tp=1, progress=False)
    out = tmp_path / "eval.json"
    run_local(_eval_worker, 1, str(tmp_path / "ckpt"), str(out))
    result = json.loads(out.read_text())
    records = result["records"]
    assert result["problems"] == len(records) == 48 and result["k"] == K
    # Re-grade every recorded response independently: the last integer in it against the answer.
    regraded = []
    for record in records:
        assert len(record["responses"]) == K
        last = [re.findall(r"-?\d+", text) for text in record["responses"]]
        regraded.append(sum(bool(n) and n[-1] == record["answer"] for n in last))
        assert regraded[-1] == record["correct"], record
        # What the grader read from each response: its last number, kept for the reader.
        assert record["extracted"] == [n[-1] if n else None for n in last], record
    assert result["avg_at_k"] == pytest.approx(sum(regraded) / (K * len(records)))
    assert result["pass_at_k"] == pytest.approx(sum(c > 0 for c in regraded) / len(records))
    assert sum(result["reasons"].values()) == K * len(records)
    # The prompts longer than the context were scored as wrong and named so; the others were sampled.
    cut = json.loads((tmp_path / "cut.json").read_text())
    too_long = [r for r in cut["records"] if r["reasons"] == ["prompt_too_long"] * K]
    assert cut["problems"] == 8 and 1 <= len(too_long) <= 4 and cut["reasons"]["prompt_too_long"] == K * len(too_long)
    assert all(r["correct"] == 0 and r["responses"] == [] for r in too_long)
    assert all(len(r["responses"]) == K for r in cut["records"] if r not in too_long)


def test_a_run_directory_stands_for_its_newest_checkpoint(tmp_path):
    from popo_megatron.checkpoint.runs import resolve_checkpoint

    run = tmp_path / "run"
    for name in ("step_000010", "step_000020"):
        (run / "checkpoints" / name).mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000020\n")
    newest = run / "checkpoints" / "step_000020"
    for given in (run, run / "checkpoints", run / "checkpoints" / "latest"):
        assert resolve_checkpoint(given) == newest, given
    older = run / "checkpoints" / "step_000010"
    assert resolve_checkpoint(older) == older and resolve_checkpoint(tmp_path / "hf") == tmp_path / "hf"
