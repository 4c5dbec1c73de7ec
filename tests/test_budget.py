"""budget.py: the grid, the collapse metrics and the choice by hand, then a smoke run of the whole
command on the --quick world (two points of a few steps)."""
import json
import os
import subprocess
import sys

import pytest

import budget
from common import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_moves_one_factor_at_a_time_around_the_centre():
    points = budget.grid((100, 4, 1e-4), steps=[50, 100, 200], users=[2, 4], lrs=[3e-5, 1e-4])
    assert points == [(100, 4, 1e-4), (50, 4, 1e-4), (200, 4, 1e-4), (100, 2, 1e-4), (100, 4, 3e-5)]
    assert budget.point_name(points[-1]) == "s100_u4_lr3e-05"


def test_collapse_metrics_are_the_means_of_the_last_tenth_of_the_training_steps():
    records = [{"step": s, "kept_frac": 1.0, "entropy": float(s), "na_rate": 0.1 * (s >= 18)} for s in range(1, 21)]
    records.insert(10, {"step": 10, "dev_avg_f1": 0.5})  # a dev evaluation's record is not a training step
    got = budget.collapse_metrics(records)
    assert got == {"entropy": 19.5, "na_rate": 0.1, "kept_frac": 1.0}  # steps 19 and 20; no majority_ratio logged
    assert budget.collapse_metrics(records[:3])["entropy"] == 3.0  # under ten steps: the last one


def test_the_choice_is_the_best_point_measured_above_the_centre_else_the_centre():
    centre = {"name": "c", "avg_f1": 0.60, "delta_low": None}
    noisy = {"name": "noisy", "avg_f1": 0.66, "delta_low": -0.01}  # higher, but its interval holds 0
    above = {"name": "above", "avg_f1": 0.62, "delta_low": 0.004}
    above2 = {"name": "above2", "avg_f1": 0.63, "delta_low": 0.002}
    assert budget.choose([centre, noisy, above, above2])["name"] == "above2"
    assert budget.choose([centre, noisy])["name"] == "c"


def test_the_centre_is_three_positive_numbers_or_one_line_of_error():
    assert budget.parse_centre("100,4,1e-4") == (100, 4, 1e-4)
    for bad in ("100,4", "100,4,0", "1e-4,4,100", "a,b,c", "100,4,1e-4,2"):
        with pytest.raises(ConfigError, match="centre: expected STEPS,USERS,LR"):
            budget.parse_centre(bad)
    with pytest.raises(ConfigError, match="centre"):
        budget.BudgetConfig(centre="100,-4,1e-4")


def test_quick_budget_runs_each_point_and_writes_the_table(tmp_path):
    out = tmp_path / "budget"
    cmd = [sys.executable, os.path.join(ROOT, "budget.py"), "--quick", "--out", str(out), "--steps", "2", "--users",
           "4", "--lrs", "3e-4", "--eval-every", "1", "--dev-size", "10", "--centre", "3,4,1e-4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "budget.json").read_text(encoding="utf-8"))
    assert [r["name"] for r in doc["rows"]] == ["s3_u4_lr0.0001", "s2_u4_lr0.0001", "s3_u4_lr0.0003"]
    for r in doc["rows"]:
        metrics = json.loads((out / "eval" / r["name"] / "metrics.json").read_text(encoding="utf-8"))
        assert r["avg_f1"] == metrics["avg_f1"]
        assert [s for s, _ in r["dev_curve"]] == list(range(r["steps"] + 1))  # eval_every 1: before step 1, then each
        assert set(r["collapse"]) >= {"kept_frac", "na_rate", "confidence"}
        config = json.loads((out / "runs" / r["name"] / "rl_config.json").read_text(encoding="utf-8"))
        assert (config["max_steps"], config["batch_size"], config["lr"], config["seed"]) == (
            r["steps"], r["users"], r["lr"], 1000)  # the point, on the dev world's seed
    assert doc["rows"][0]["delta"] == 0.0 and doc["rows"][1]["delta_low"] <= doc["rows"][1]["delta_high"]
    assert doc["choice"] in [r["name"] for r in doc["rows"]]
    assert (out / "budget.png").stat().st_size > 0 and "Choice:" in (out / "budget.md").read_text(encoding="utf-8")
