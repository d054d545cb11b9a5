"""`popo parity --layouts`: any TP / PP / SP combination the model allows, checked before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from popo_megatron.parity import Layout, parse_layout


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tp1", Layout("tp1")),
        ("tp3", Layout("tp3", tp=3)),
        ("tp3_pp2", Layout("tp3_pp2", tp=3, pp=2)),
        ("pp2_tp2_sp", Layout("pp2_tp2_sp", tp=2, pp=2, sp=True)),
        ("pp4", Layout("pp4", pp=4)),
    ],
)
def test_layout_names_parse(name, expected):
    layout = parse_layout(name)
    assert layout == expected and layout.world == expected.tp * expected.pp


@pytest.mark.parametrize("name", ["tp", "tp0", "tp2_tp2", "dp2", "tp2-pp2", "sp_sp", ""])
def test_malformed_layout_names_are_refused(name):
    with pytest.raises(ValueError, match="expected tpN, ppM and sp"):
        parse_layout(name)


def _parity(hf, layouts: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "popo_megatron", "parity", "--hf", str(hf), "--layouts", layouts]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_parity_runs_a_named_layout_and_refuses_one_the_model_forbids(tiny_models):
    hf = tiny_models["qwen2_tied"]  # 4 attention heads, 2 KV heads, 4 layers
    refused = _parity(hf, "tp1,tp3")
    assert refused.returncode == 2
    assert "popo parity: error:" in refused.stderr and "does not divide the model's 4 attention heads" in refused.stderr
    assert "max |logits" not in refused.stdout, "nothing ran before the check"
    assert _parity(hf, "tp1,sp").returncode == 2  # SP without TP
    ran = _parity(hf, "tp1")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "tp1" in ran.stdout and "logits match transformers" in ran.stdout
