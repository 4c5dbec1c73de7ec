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


def _row(name, avg_f1, low=None, high=None, steps=100, users=4, lr=1e-4):
    delta = None if low is None else (low + high) / 2
    return {"name": name, "steps": steps, "users": users, "lr": lr, "avg_f1": avg_f1, "delta": delta,
            "delta_low": low, "delta_high": high}


def test_across_worlds_a_point_moves_the_config_only_where_it_is_above_the_centre_on_every_world():
    w1 = [_row("c", 0.60), _row("a", 0.62, 0.005, 0.03), _row("b", 0.66, 0.02, 0.08), _row("d", 0.70, 0.05, 0.15)]
    w2 = [_row("c", 0.61), _row("a", 0.625, 0.001, 0.02), _row("b", 0.60, -0.02, 0.00)]  # b: not above; d: not run
    chosen, table = budget.choose_across([w1, w2])
    assert chosen == "a"  # b and d are higher on world 1000, but b is not above on 1001 and d did not run there
    assert list(table) == ["c", "a", "b", "d"] and table["d"][1] is None and table["a"][1]["avg_f1"] == 0.625
    w2[1] = _row("a", 0.63, -0.001, 0.02)  # a's interval on 1001 now holds 0: no point is above everywhere
    assert budget.choose_across([w1, w2])[0] == "c"
    w2 += [_row("d", 0.64, 0.01, 0.05)]  # d above on both, its mean (0.70 + 0.64) / 2 above a's
    assert budget.choose_across([w1, w2])[0] == "d"


def _world(folder, seed, rows, **settings):
    """A finished budget folder by hand: budget.json and the centre run's rl_config.json."""
    rl = {"model": f"{folder}/world/sft", "seed": seed, "output_dir": f"{folder}/runs/{rows[0]['name']}",
          "temperature": 1.0, "num_generations": 8, "_inputs": {"data": f"sha256 of world {seed}"}, **settings}
    os.makedirs(folder / "runs" / rows[0]["name"])
    (folder / "runs" / rows[0]["name"] / "rl_config.json").write_text(json.dumps(rl), encoding="utf-8")
    doc = {"config": {"seed": seed}, "rows": rows, "choice": rows[0]["name"],
           "headroom": {"sft_greedy": 0.6, "sft_self_vote": 0.62, "samples": 8, "na_weight": 0.3}}
    (folder / "budget.json").write_text(json.dumps(doc), encoding="utf-8")
    return str(folder)


def test_choose_reads_the_worlds_folders_and_refuses_worlds_that_do_not_compare(tmp_path):
    c, a = _row("s100_u4_lr0.0001", 0.60), _row("s200_u4_lr0.0001", 0.63, 0.01, 0.05, steps=200)
    b = _row("s100_u4_lr0.0003", 0.66, -0.01, 0.10, lr=3e-4)
    w1 = _world(tmp_path / "w1000", 1000, [c, a, b])
    w2 = _world(tmp_path / "w1001", 1001, [_row("s100_u4_lr0.0001", 0.62), _row("s200_u4_lr0.0001", 0.64, 0.002, 0.03,
                                                                                steps=200)])
    out = tmp_path / "choice"
    chosen, _ = budget.main(["choose", w1, w2, "--out", str(out)])
    assert chosen == "s200_u4_lr0.0001"
    doc = json.loads((out / "choice.json").read_text(encoding="utf-8"))
    assert doc["seeds"] == [1000, 1001] and doc["choice"] == chosen and doc["points"]["s100_u4_lr0.0003"][1] is None
    md = (out / "choice.md").read_text(encoding="utf-8")
    assert "| 200 | 4 | 0.0001 | 63.00, +3.00 [+1.00, +5.00] | 64.00, +1.60 [+0.20, +3.00] | 63.50 | yes |" in md
    assert "Choice: 200 steps, 4 users a step, lr 0.0001 (measured above the centre on every world)." in md
    refusals = [([w1], "expected two or more budget folders"), ([w1, w1], "a world of its own seed each"),
                ([w1, str(tmp_path / "none")], "budget.json: not found"),
                ([w1, _world(tmp_path / "c", 1002, [a, c])], "expected one centre on every world"),
                ([w1, _world(tmp_path / "t", 1003, [c, a], temperature=0.7)], r"other settings \(temperature\)")]
    for folders, message in refusals:
        with pytest.raises(ConfigError, match=message):
            budget.main(["choose", *folders, "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()  # a refusal writes nothing
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "budget.py"), "choose", w1, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "budget.py: error: choose:" in proc.stderr
