"""Unconverged runs: `convergence.trend` on hand-made curves (rising, plateaued, peaked and
fell, grokking past and not yet past its early peak, noisy flat, too few points), and end to
end a hand-built sweep where one group still rises and one has plateaued: the report's marker,
its line under the table, csv/json `still_rising`, status's curve column, and --log_steps."""

from __future__ import annotations

import csv
import io
import json
import math
import random
from pathlib import Path

import pytest

from revjepa.cli import main
from revjepa.config import SPLITS, RunConfig
from revjepa.convergence import MIN_RISE, late_start, noise_scale, trend
from revjepa.report import band_figure, choose_metrics, find_runs, group_runs, load_run
from revjepa.runlog import write_run_state
from revjepa.status import collect_status, format_status

K1 = [1000 * i for i in range(1, 13)]  # 12 evaluations, every 1k steps
# the curve: test entity MRR every 2k steps, 1 layer, wd 1.0 (peak, dip, grokking)
GROK_STEPS = [2000 * i for i in range(1, 13)]
GROK = [0.150, 0.089, 0.089, 0.142, 0.260, 0.370, 0.502, 0.552, 0.574, 0.641, 0.692, 0.670]
PLATEAU = [0.10, 0.30, 0.45, 0.55, 0.60, 0.61, 0.60, 0.61, 0.60, 0.61, 0.60, 0.61]


# ----------------------------------------------------------------------------- the rule


def test_steadily_rising_is_flagged():
    t = trend(K1, [0.05 * i for i in range(1, 13)])
    assert t.rising and t.verdict == "still rising" and t.noise == pytest.approx(0, abs=1e-12)
    assert t.shape == "still rising: best 0.6 at 12k = last"


def test_plateau_is_not_flagged():
    t = trend(K1, PLATEAU)
    assert not t.rising and t.verdict == "flat" and t.late_gain == pytest.approx(0)
    assert t.shape == "best 0.61 at 6k, last 0.61"  # the earliest of equal values


def test_peaked_then_fell_is_not_flagged():
    t = trend(K1, [0.15, 0.30, 0.25, 0.20, 0.18, 0.15, 0.12, 0.10, 0.10, 0.09, 0.09, 0.09])
    assert not t.rising and t.verdict == "fell" and t.late_gain < 0
    assert t.shape == "best 0.3 at 2k, last 0.09 (fell)"


def test_grokking_past_its_early_peak_is_flagged():
    t = trend(GROK_STEPS, GROK)
    # late part: 20k, 22k, 24k (> 75% of 24k); best late 0.692, best early 0.574 (18k)
    assert late_start(GROK_STEPS) == 9 and t.late_gain == pytest.approx(0.692 - 0.574)
    assert t.rising and t.late_gain > t.threshold
    assert t.shape == "still rising: best 0.692 at 22k, last 0.67"
    # the run stopped at 8k had not risen back above its 2k peak yet
    early = trend(GROK_STEPS[:4], GROK[:4])
    assert not early.rising and early.shape == "best 0.15 at 2k, last 0.142"


def test_grokking_not_yet_past_its_early_peak_is_not_flagged():
    """Rising at the end, but the best checkpoint is the early peak: the report's best is not
    the one that would move, so no flag; the shape says it is climbing back."""
    t = trend(K1, [0.50, 0.30, 0.20, 0.20, 0.22, 0.26, 0.30, 0.34, 0.38, 0.42, 0.45, 0.48])
    assert not t.rising and t.verdict == "rising again" and t.best_step == 1000
    assert t.shape == "best 0.5 at 1k, last 0.48 (fell, rising again)"


def test_noisy_flat_is_not_flagged():
    rng = random.Random(26)
    values = [0.5 + rng.gauss(0, 0.02) for _ in range(20)]
    t = trend([500 * i for i in range(1, 21)], values)
    assert not t.rising and t.verdict in ("flat", "fell")
    assert 0.01 < t.noise < 0.04  # the noise it was made with, 0.02, to a factor of 2


def test_noise_scale_recovers_the_noise_and_ignores_a_bending_trend():
    rng = random.Random(0)
    noise = [rng.gauss(0, 0.03) for _ in range(2000)]
    assert noise_scale(noise) == pytest.approx(0.03, rel=0.1)
    # a sigmoid that rises by 0.6 over the run inflates first differences, not this estimate
    bent = [0.6 / (1 + math.exp(-(i - 1000) / 150)) + e for i, e in enumerate(noise)]
    assert noise_scale(bent) == pytest.approx(0.03, rel=0.1)
    assert math.isnan(noise_scale([0.1, 0.2]))


def test_too_few_points_and_a_noiseless_creep_are_not_flagged():
    t = trend([1000, 2000, 3000], [0.1, 0.2, 0.3])
    assert not t.rising and t.verdict == "too few" and math.isnan(t.threshold)
    assert t.shape == "best 0.3 at 3k = last (3 evaluations: too few to judge)"
    assert t.as_dict()["noise"] is None and t.as_dict()["shape"] == t.shape
    creep = trend(K1, [0.5 + 0.0005 * i for i in range(12)])  # no noise: MIN_RISE decides
    assert creep.threshold == MIN_RISE and not creep.rising


def test_late_part_and_order():
    assert late_start([100, 200, 300, 400]) == 2  # at least 2 in the early part
    assert late_start([10, 20, 30, 40, 100]) == 3  # at least the last 2 in the late part
    shuffled = list(zip(GROK_STEPS, GROK))
    random.Random(1).shuffle(shuffled)
    assert trend(*zip(*shuffled)) == trend(GROK_STEPS, GROK)
    with pytest.raises(ValueError):
        trend([1, 2], [0.1])


# ----------------------------------------------------------------------------- end to end


def write_run(run_dir: Path, seed: int, lr: float, steps: list[int], test: list[float]) -> None:
    """A finished, evaluated run as train + sweep leave it (RunConfig's own training_args.json,
    eval_all.jsonl, run_state.json); `test` is its entity MRR on test, other splits flat."""
    args = RunConfig().to_dict()
    args["train"].update(seed=seed, learning_rate=lr, output_dir=str(run_dir))
    args["resolved"] = {"headline_metric": "mrr", "comparable_metric": "entity_mrr"}
    run_dir.mkdir(parents=True)
    (run_dir / "training_args.json").write_text(json.dumps(args))
    lines = []
    for step, value in zip(steps, test):
        per = {"test": value, "atomic": 0.9, "train": 1.0}
        splits = {s: {"entity_mrr": per[s], "mrr": per[s], "num_entities": 500} for s in SPLITS}
        lines.append(json.dumps({"step": step, "splits": splits}) + "\n")
    (run_dir / "eval_all.jsonl").write_text("".join(lines))
    write_run_state(run_dir, "finished", steps[-1], steps[-1], None)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two groups x 2 seeds (seeds 0.01 above and below the group's curve): `grokking` (the
    issue's curve), `plateau`."""
    root = tmp_path_factory.mktemp("rising") / "sweep"
    plan = []
    for variant, lr, steps, curve in (
        ("grokking", 1e-3, GROK_STEPS, GROK),
        ("plateau", 3e-4, K1, PLATEAU),
    ):
        for seed, offset in ((0, 0.01), (1, -0.01)):
            name = f"{variant}-seed{seed}"
            write_run(root / "runs" / name, seed, lr, steps, [v + offset for v in curve])
            plan.append({"name": name, "variant": variant, "seed": seed, "grid": {}})
    (root / "sweep.json").write_text(json.dumps({"name": "rising", "runs": plan}))
    return root


def test_report_marks_the_group_still_rising(sweep, capsys):
    assert main(["report", str(sweep)]) == 0
    table = capsys.readouterr().out
    rows = {x.split(" | ")[0][2:]: x for x in table.splitlines() if x.startswith("| ")}
    # the test best (the select split's) of grokking: 0.692 +- 0.0141 over its 2 seeds
    assert "| 0.6920 ± 0.0141 ↑ |" in rows["grokking"]
    assert "↑" not in rows["plateau"] and "↑" not in rows["group"]
    note = next(x for x in table.splitlines() if "still rising at the last checkpoint" in x)
    assert note.startswith(
        "↑ still rising at the last checkpoint: conclusions provisional; train longer: "
        "grokking (2 of 2 seeds rise on their own)."
    )
    assert "plateau" not in note

    assert main(["report", str(sweep), "--format", "json"]) == 0
    out = {r["group"]: r for r in json.loads(capsys.readouterr().out)}
    assert out["grokking"]["still_rising"] is True and out["grokking"]["rising_seeds"] == 2
    assert out["grokking"]["curve"]["shape"] == "still rising: best 0.692 at 22k, last 0.67"
    assert out["plateau"]["still_rising"] is False and out["plateau"]["rising_seeds"] == 0

    assert main(["report", str(sweep), "--format", "csv"]) == 0
    out = {r["group"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert (out["grokking"]["still_rising"], out["grokking"]["rising_seeds"]) == ("True", "2")
    assert (out["plateau"]["still_rising"], out["plateau"]["rising_seeds"]) == ("False", "0")


def test_report_marks_the_split_it_selects_on(sweep, capsys):
    """Selected on atomic (flat at 0.9 in every run): nothing is still rising there."""
    assert main(["report", str(sweep), "--select_split", "atomic", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["still_rising"] for r in rows] == [False, False]
    assert main(["report", str(sweep), "--select_split", "atomic"]) == 0
    assert "↑" not in capsys.readouterr().out


def test_status_shows_the_curve_and_the_flag(sweep, capsys):
    rows = {Path(r["run_dir"]).name: r for r in collect_status([sweep], verify=False)}
    grok = rows["grokking-seed0"]
    assert grok["still_rising"] is True
    assert grok["curve"]["metric"] == "entity_mrr" and grok["curve"]["split"] == "test"
    assert grok["curve"]["shape"] == "still rising: best 0.702 at 22k, last 0.68"
    flat = rows["plateau-seed1"]
    assert flat["still_rising"] is False and flat["curve"]["shape"] == "best 0.6 at 6k, last 0.6"
    table = format_status(list(rows.values()))
    assert "curve (entity_mrr on test)" in table.splitlines()[0]
    assert "still rising: best 0.702 at 22k, last 0.68" in table
    assert main(["status", "--json", "--no_verify", str(sweep / "runs" / "grokking-seed1")]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["still_rising"] is True and row["curve"]["rising"] is True


def test_log_steps_reaches_the_plot(sweep, tmp_path, capsys, monkeypatch):
    runs = [load_run(p) for p in find_runs([sweep])]
    groups = group_runs(runs, choose_metrics(runs, None)[0])
    assert {ax.get_xscale() for ax in band_figure(groups, log_steps=True).axes} == {"log"}
    assert {ax.get_xscale() for ax in band_figure(groups).axes} == {"linear"}
    import revjepa.report as report_mod

    seen = []
    monkeypatch.setattr(report_mod, "plot_groups", lambda g, out, log: seen.append((out, log)))
    png = tmp_path / "bands.png"
    assert main(["report", str(sweep), "--plot", str(png), "--log_steps"]) == 0
    assert seen == [(png, True)]
    assert main(["report", str(sweep), "--log_steps"]) == 2
    assert "--log_steps applies to --plot" in capsys.readouterr().err


def test_report_header_says_why_it_fell_back(tmp_path, capsys):
    """A run whose entity_mrr was skipped (`--entity_mrr auto`: the key is absent, never 0)
    sends the report to the headline metric, and its header says which runs lack what."""
    write_run(tmp_path / "a", 0, 1e-3, K1[:4], [0.1, 0.2, 0.3, 0.4])
    write_run(tmp_path / "b", 1, 1e-3, K1[:4], [0.1, 0.2, 0.3, 0.4])
    records = (tmp_path / "b" / "eval_all.jsonl").read_text().splitlines()
    skipped = []
    for line in records:
        r = json.loads(line)
        for m in r["splits"].values():
            del m["entity_mrr"]
        skipped.append(json.dumps(dict(r, entity_mrr_computed=False)) + "\n")
    (tmp_path / "b" / "eval_all.jsonl").write_text("".join(skipped))
    assert main(["report", str(tmp_path)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "each family's headline metric (not the entity-level metric: 1 of 2 runs lack " in header
    assert "`entity_mrr`" in header and "--entity_mrr auto" in header
    assert header.startswith("Metric: `mrr` (gpt2_jepa)")
