"""End to end: `python pipeline.py --quick` runs every stage through the scripts' own command
lines, writes the paper-shaped table, and a second invocation skips every finished stage."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ["teacher_single", "teacher_vote", "student_init", "student_sft", "student_rl"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "seed0"  # where study.py --seeds 0 keeps seed 0 (the last test)
    out.mkdir()
    cmd = [sys.executable, os.path.join(ROOT, "pipeline.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=str(out))  # run from another folder
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_demo_writes_every_row(quick_run):
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results["rows"]) == ROWS
    for key in ROWS:
        m = results["rows"][key]
        assert 0.0 <= m["avg_f1"] <= 1.0
        assert len(m["threshold_sweep"]) == 10
        assert set(m["per_dimension"]) == {"gender", "age", "education", "industry", "occupation", "life_stage"}
    rows = results["rows"]
    # The Stage-1 premise on the world: voting 8 answers beats one answer.
    assert rows["teacher_vote"]["avg_f1"] > rows["teacher_single"]["avg_f1"] + 0.05
    # SFT teaches the untrained student the answer format and something of the users.
    assert rows["student_init"]["format_failure_rate"] > 0.9
    assert rows["student_sft"]["format_failure_rate"] < 0.8  # --quick trains 60 steps only
    assert rows["student_sft"]["avg_f1"] > rows["student_init"]["avg_f1"] + 0.05
    md = (out / "results.md").read_text(encoding="utf-8")
    for name in ("teacher, one answer", "teacher, vote@8", "student before training", "after SFT", "after SFT + RL"):
        assert f"| {name} |" in md
    # Each stage's equivalent command line is printed and recorded (the run doubles as a tutorial).
    shown = [line for line in stdout.splitlines() if line.startswith("$ ")]
    for script in ("profilebench.py", "label.py", "calibrate.py", "sft.py", "rl.py", "evaluate.py", "predict.py"):
        assert any(f" {script} " in line for line in shown), script
    assert any(line.startswith("$ torchrun --standalone --nproc_per_node=2 sft.py") for line in shown)  # both cores, 1 thread each
    # The RL log carries what shows a label-free run going wrong before F1 does (docs/design.md, "Reading a Stage-2 run").
    last = json.loads((out / "rl" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    for key in ("na_rate", "majority_ratio", "entropy", "probe_agreement", "kept", "format_fail", "confidence",
                "zero_var_frac", "optimizer_step"):
        assert key in last, key
    assert 0.0 <= last["probe_agreement"] <= 1.0 and 0.0 <= last["majority_ratio"] <= 1.0
    # The figures: F1 of the rows next to results.md (embedded), each evaluation's, each run's training curves.
    for png in ("f1_comparison.png", "sft/training_curves.png", "rl/training_curves.png", "eval/student_rl/pr_curve.png",
                "eval/student_rl/reliability.png", "eval/teacher_vote/pr_curve.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG"), png
        assert f"]({png})" in md or png.startswith("eval/teacher"), png
    # Thresholds for a precision of 0.9: chosen on a dev world of its own, applied to the test users.
    dims = set(rows["student_rl"]["per_dimension"])
    dev, test = results["thresholds"]["dev"], results["thresholds"]["test"]
    assert dev["target_precision"] == 0.9 and set(dev["dimensions"]) == set(test["dimensions"]) == dims
    assert all(test["dimensions"][d]["tau"] == dev["dimensions"][d]["tau"] for d in dims)
    assert dev["data"].endswith("thresholds/dev_world/test.jsonl") and "## Thresholds for a precision of 0.90" in md
    # Finished SFT / RL outputs are HF checkpoints.
    for d in ("sft", "rl", "student_init"):
        assert (out / d / "config.json").exists() and (out / d / "model.safetensors").exists()


def test_quick_demo_second_run_skips_finished_stages(quick_run):
    out, _ = quick_run
    cmd = [sys.executable, os.path.join(ROOT, "pipeline.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "=== " not in proc.stdout  # no stage ran again
    assert proc.stdout.count("[skip]") >= 12
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["rows"]["student_rl"]["avg_f1"] >= 0


def test_quick_demo_rerun_with_another_seed_is_refused(quick_run):
    """#13 item 4: the stage markers record each stage's command: a rerun with --seed 1 into the same --out
    is refused naming the stage and the flag, instead of reporting the seed-0 numbers as seed 1's."""
    out, _ = quick_run
    before = (out / "results.json").read_bytes()
    cmd = [sys.executable, os.path.join(ROOT, "pipeline.py"), "--quick", "--out", str(out), "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("pipeline.py: error: stage world: ") and "--seed 0 -> 1" in proc.stderr
    assert "use a fresh --out" in proc.stderr and (out / "results.json").read_bytes() == before


# One variant of each kind: an SFT ablation (calibrate.py flags), two RL ablations (rl.py flags) and the
# continued-SFT control. Every RL variant's flags train in test_rl.py (through rl.main, seconds each) and
# every SFT ablation's flags in test_calibrate.py; all 16 through the scripts took 577 s of CI (loaded machine).
VARIANTS = {"sft_labels_only": "--target labels_only", "rl_no_weighting": "--confidence-weighting off",
            "rl_calibration_reward": "--calibration-reward 1 --confidence-weighting off", "sft_continued": "--init-student false"}


def test_quick_ablations_run_a_variant_of_each_kind_and_write_one_table(quick_run):
    out, _ = quick_run
    cmd = [sys.executable, os.path.join(ROOT, "pipeline.py"), "--quick", "--ablations", "--variants", ",".join(VARIANTS),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)  # ~130 s on an idle 2-core machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shown = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    for key, flags in VARIANTS.items():
        assert any(flags in line and f"ablations/{key}/" in line for line in shown), key
    # the continued-SFT control: from the SFT student, RL's 3 quick updates at rl_demo.json's lr and warm-up
    assert any("sft.py" in line and f"--model {out}/sft --init-student false" in line
               and "--max-steps 3 --lr 0.0001 --warmup-steps 2" in line for line in shown), shown
    ablations = json.loads((out / "results.json").read_text(encoding="utf-8"))["ablations"]
    assert len(ablations) == 5 and "full method" in ablations
    assert all(0.0 <= m["avg_f1"] <= 1.0 for m in ablations.values())
    assert "## Ablations" in (out / "results.md").read_text(encoding="utf-8")


def test_quick_study_reads_the_seed_back_into_one_table(quick_run):
    """study.py --quick --seeds 0 on the folder above the quick demo: pipeline.py --seed 0 --ablations skips
    every finished stage (the ablations test ran them; alone, this test runs them), then the table has a row
    per evaluated run with its interval, the full method as reference, and the RL runs' mechanism metrics."""
    out, _ = quick_run
    cmd = [sys.executable, os.path.join(ROOT, "study.py"), "--quick", "--seeds", "0", "--out", str(out.parent),
           "--bootstrap", "50", "--variants", ",".join(VARIANTS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out.parent / "study.json").read_text(encoding="utf-8"))
    rows = {r["key"]: r for r in doc["rows"]}
    assert len(rows) == 2 + len(VARIANTS) and doc["n_users"] == 200
    full = rows["student_rl"]
    assert full["reading"] == "reference" and full["delta"] == 0 and full["delta_per_seed"] == {"0": 0.0}
    sft = rows["student_sft"]
    assert sft["delta_sft"] == 0 and full["delta_sft"] == pytest.approx(-sft["delta"], abs=1e-12)  # RL over SFT
    assert full["delta_sft_low"] == pytest.approx(-sft["delta_high"], abs=1e-12)  # the same draws, the other way round
    metrics = json.loads((out / "eval" / "student_sft" / "metrics.json").read_text(encoding="utf-8"))
    assert rows["student_sft"]["avg_f1"] == pytest.approx(metrics["avg_f1"], abs=1e-12)
    for r in rows.values():
        assert r["avg_f1_low"] <= r["avg_f1"] <= r["avg_f1_high"] and r["delta_low"] <= r["delta_high"]
        assert r["delta_sft_low"] <= r["delta_sft_high"]
    assert set(full["mechanism"]) == {"kept_frac", "too_easy_frac", "too_hard_frac", "vote_flip", "reward_flip"}
    assert rows["rl_no_weighting"]["mechanism"]["reward_flip"] == 0.0  # confidence_weighting off: w = 1
    assert rows["student_sft"]["mechanism"] == {}
    md = (out.parent / "study.md").read_text(encoding="utf-8")
    assert "| after SFT + RL (full method) |" in md and "| Δ vs after SFT [95 %] |" in md


def test_quick_ablations_of_chosen_variants_table_only_those(quick_run):
    """--variants runs (here: finds finished) only the named variants, and the ablation table and its paired
    comparison hold the full method and those, in the table's order whatever the order given."""
    out, _ = quick_run
    cmd = [sys.executable, os.path.join(ROOT, "pipeline.py"), "--quick", "--ablations", "--variants",
           "sft_continued,rl_no_weighting", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = [line[4:] for line in proc.stdout.splitlines() if line.startswith("=== ")]
    assert "compare_ablations" in ran and all(  # after the test above only the comparison; alone, these two too
        name == "compare_ablations" or name.endswith(("_rl_no_weighting", "_sft_continued")) for name in ran), ran
    ablations = json.loads((out / "results.json").read_text(encoding="utf-8"))["ablations"]
    assert list(ablations) == ["full method", "RL without confidence weighting",
                               "control: SFT continued for RL's number of updates"]
    paired = json.loads((out / "eval" / "compare_ablations" / "comparison.json").read_text(encoding="utf-8"))
    assert len(paired["differences"]) == 2
