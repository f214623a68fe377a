"""The JEPA collapse alarm: hand-made records (window, threshold, NaN, one warning per episode,
resume mid-stream), and real tiny runs: the cosine JEPA distance collapses the embeddings on
this task (mean cosine ~1), in-batch InfoNCE does not (its negatives push items apart)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from revjepa.cli import main
from revjepa.collapse import CollapseAlarm, collapse_summary
from revjepa.data import GenConfig, generate, write_generated


def recs(values: list[float]) -> list[dict]:
    return [
        {"step": 10 * (i + 1), "pred_mean_cos": v, "pred_std": 0.01} for i, v in enumerate(values)
    ]


# 4 above, a dip, 6 above, a NaN, 5 above, a dip: with window 5 the alarm fires at the 5th record
# of the second run (index 10, step 110) and at the 5th after the NaN (index 17, step 180)
COS = [0.5, 0.995, 0.999, 0.995, 0.999, 0.3] + [0.995] * 6 + [math.nan] + [0.999] * 5 + [0.1]
EXPECTED = [False] * 10 + [True, True] + [False] * 5 + [True, False]


def test_alarm_marks_the_records_and_warns_once_per_episode():
    alarm, warnings = CollapseAlarm(0.99, 5), []
    records = recs(COS)
    for r in records:
        if (w := alarm.observe(r)) is not None:
            warnings.append(w)
    assert [r["collapse"] for r in records] == EXPECTED
    assert len(warnings) == 2
    assert warnings[0].startswith("JEPA collapse at step 110: pred_mean_cos > 0.99")
    # the window's values are named: steps 70..110 (the records after the dip)
    assert "(70: 0.9950, 80: 0.9950, 90: 0.9950, 100: 0.9950, 110: 0.9950)" in warnings[0]
    assert warnings[1].startswith("JEPA collapse at step 180")
    assert alarm.first_step == 110 and alarm.collapsed_records == 3
    assert "first at step 110, 3 log record(s)" in alarm.summary()
    assert collapse_summary(records) == {
        "collapse": True,
        "collapse_first_step": 110,
        "collapsed_records": 3,
        "collapsed_now": False,
        "last_pred_mean_cos": 0.1,
    }


def test_alarm_state_survives_a_resume_mid_stream():
    """A checkpoint between any two records: the resumed alarm marks what the uninterrupted one
    does (its state goes into checkpoints)."""
    uninterrupted = CollapseAlarm(0.99, 5)
    for r in recs(COS):
        uninterrupted.observe(r)
    for cut in range(len(COS) + 1):
        first, records = CollapseAlarm(0.99, 5), recs(COS)
        for r in records[:cut]:
            first.observe(r)
        resumed = CollapseAlarm(0.99, 5)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for r in records[cut:]:
            resumed.observe(r)
        assert [r["collapse"] for r in records] == EXPECTED, cut
        assert resumed.state_dict() == uninterrupted.state_dict(), cut
        assert resumed.summary() == uninterrupted.summary()


def test_window_zero_is_off_and_records_without_the_signal_are_untouched():
    off = CollapseAlarm(0.99, 0)
    records = recs([1.0] * 10)
    assert all(off.observe(r) is None for r in records)
    assert all("collapse" not in r for r in records) and off.summary() is None
    on, ntp_only = CollapseAlarm(0.99, 1), {"step": 5, "loss": 1.0}
    assert on.observe(ntp_only) is None and "collapse" not in ntp_only
    assert on.observe({"step": 6, "pred_mean_cos": 0.995}) is not None  # window 1: at once


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_generated(
        generate(GenConfig(num_ga_entities=200, num_rel_pairs=2, test_size=40, seed=1)), d
    )
    return d


TINY = [
    *("--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_size", "32"),
    *("--learning_rate", "1e-3", "--dropout", "0", "--device", "cpu", "--log_interval", "10"),
    *("--eval_steps", "1000", "--save_steps", "1000", "--save_step_dense", "60"),
    *("--save_step_dense_interval", "60"),
]


def train(data_dir: Path, out: Path, *extra: str) -> list[dict]:
    assert (
        main(["train", "--data_dir", str(data_dir), "--output_dir", str(out), *TINY, *extra]) == 0
    )
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_cosine_run_collapses_and_infonce_run_does_not(data_dir, tmp_path):
    """Measured on this task (seed 42): the cosine run's pred_mean_cos is > 0.9994 at every log
    step; the InfoNCE run falls below 0.7 by step 20 and stays under 0.2 after step 50."""
    cos_run = train(data_dir, tmp_path / "cos", "--max_steps", "120", "--distance_metric", "cosine")
    cos_values = [r["pred_mean_cos"] for r in cos_run]
    assert min(cos_values) > 0.99  # the premise: this run is collapsed
    # independent of the alarm: the first record that ends 5 consecutive records above 0.99
    assert [r["collapse"] for r in cos_run] == [i >= 4 for i in range(len(cos_run))]
    nce_run = train(
        data_dir, tmp_path / "nce", "--max_steps", "120", "--distance_metric", "infonce"
    )
    assert max(r["pred_mean_cos"] for r in nce_run[2:]) < 0.9  # the premise: not collapsed
    assert not any(r["collapse"] for r in nce_run)
    text = (tmp_path / "cos" / "training.log").read_text()
    warned = [x for x in text.splitlines() if "JEPA collapse at step" in x]
    assert len(warned) == 1 and "JEPA collapse at step 50" in warned[0]
    assert "JEPA collapse alarm: first at step 50, 8 log record(s)" in text  # final summary
    assert "JEPA collapse" not in (tmp_path / "nce" / "training.log").read_text()


def test_collapse_flags_continue_exactly_across_a_resume(data_dir, tmp_path):
    """Stopped at step 30 (3 collapsed records: no alarm yet), resumed to 60 (the alarm fires
    at 50), resumed to 120: the same flags as the uninterrupted run, and one warning in all."""
    full = train(data_dir, tmp_path / "full", "--max_steps", "120")
    out = tmp_path / "cut"
    train(data_dir, out, "--max_steps", "30")
    train(data_dir, out, "--max_steps", "60", "--resume_from", "latest")
    resumed = train(data_dir, out, "--max_steps", "120", "--resume_from", "latest")
    assert [r["collapse"] for r in resumed] == [r["collapse"] for r in full]
    text = (out / "training.log").read_text()
    assert len([x for x in text.splitlines() if "JEPA collapse at step" in x]) == 1
