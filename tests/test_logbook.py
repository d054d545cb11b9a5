"""The run's JSON-lines logs survive a kill in the middle of a write: the torn record is cut before the
resumed run appends (the kill -9 test in tests/test_faults.py runs it through `popo train`)."""

from __future__ import annotations

import json

import pytest

from popo_megatron.trainer.logbook import drop_torn_tail, read_metrics


@pytest.mark.parametrize("block", [4, 1 << 16], ids=["tail_read_in_pieces", "tail_in_one_read"])
def test_a_torn_last_record_is_cut_and_the_complete_ones_kept(tmp_path, block):
    path = tmp_path / "metrics.jsonl"
    complete = [json.dumps({"step": s, "loss": 0.5 * s}) + "\n" for s in (1, 2)]
    path.write_text("".join(complete) + '{"step": 3, "lo')
    drop_torn_tail(path, block)
    assert path.read_text() == "".join(complete)
    with open(path, "a") as f:  # what the resumed run then appends
        f.write(json.dumps({"step": 3, "loss": 1.5}) + "\n")
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_complete_empty_and_wholly_torn_files(tmp_path):
    whole = tmp_path / "whole.jsonl"
    whole.write_text('{"step": 1}\n')
    drop_torn_tail(whole)
    assert whole.read_text() == '{"step": 1}\n'
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"step": 1, "lo')
    drop_torn_tail(torn, block=4)
    assert torn.read_text() == ""
    drop_torn_tail(tmp_path / "absent.jsonl")  # a fresh run has none
    assert not (tmp_path / "absent.jsonl").exists()
