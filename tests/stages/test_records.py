"""stages/_records.py: the run records that keep timings and run ids out of the tracked metrics (issue 22)."""

import json

import pytest

from stages import _records as records


def test_split_takes_the_volatile_keys_out_at_any_depth():
    metrics = {"steps": 900, "train_seconds": 12.5, "mlflow_run_id": "abc", "final_loss": 0.4,
               "tuned": {"visual_score": 0.9, "generation_ms_per_sample": 3.0, "per_type": {"colour": 1.0}},
               "pruned": {"visual_score": 0.8}}
    results, record = records.split(metrics)
    assert results == {"steps": 900, "final_loss": 0.4, "tuned": {"visual_score": 0.9, "per_type": {"colour": 1.0}},
                       "pruned": {"visual_score": 0.8}}
    assert record == {"train_seconds": 12.5, "mlflow_run_id": "abc", "tuned": {"generation_ms_per_sample": 3.0}}
    assert records.split(results) == (results, {})  # results only: nothing left to take out


def test_a_record_is_read_back_while_the_outputs_it_describes_are_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics" / "tune").mkdir(parents=True)
    described = tmp_path / "metrics" / "tune" / "x.json"
    described.write_text(json.dumps({"steps": 2}))
    records.write({"mlflow_run_id": "abc", "train_seconds": 1.5}, "tune", "x", describes=(described.relative_to(tmp_path),))
    assert (tmp_path / "runs" / "tune" / "x.json").is_file()
    assert records.read("tune", "x")["mlflow_run_id"] == "abc"
    described.write_text(json.dumps({"steps": 3}))  # DVC restored another run's outputs: the record is not theirs
    assert records.read("tune", "x") == {}


@pytest.mark.parametrize("content", [None, "not json", "[1, 2]", '{"describes": {"missing.json": "00"}}'])
def test_no_record_or_an_unusable_one_reads_as_none(tmp_path, monkeypatch, content):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "build_base.json").write_text(content)
    assert records.read("build_base") == {}
