"""What sft.py / rl.py accept as their output folder and their resume (trainer.py, checkpoint.py): the weights a
run started from are part of its record, one run holds its output_dir, a finished run is not silently mixed
with a new one, a torn metrics line or a missing rank file of a sharded state is one clear line."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import checkpoint
import common
import sft
from test_sft import run_args, weights, world  # noqa: F401  (world: the SFT fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sft_cli(*args, timeout=240):
    return subprocess.run([sys.executable, "sft.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def copy_student(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(dst, name), "wb") as b:
            b.write(a.read())
    return str(dst)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_on_other_weights_under_the_same_path_is_refused(world, tmp_path, lora):  # noqa: F811
    """The student folder is retrained in place between the kill and the resume: same path, other weights.
    The resume is refused naming the checkpoint and the file; --force-resume goes on."""
    student = copy_student(world.student, tmp_path / "student")
    out = tmp_path / "out"
    extra = dict(lora_rank=4) if lora else {}
    sft.main(run_args(world, out, model=student, save_every=2, stop_after_steps=3, **extra))
    assert (out / "train_state").exists()
    tensors = load_file(os.path.join(student, "model.safetensors"))
    tensors = {k: v + 0.01 for k, v in tensors.items()}
    save_file(tensors, os.path.join(student, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(common.ConfigError, match=r"model checkpoint .*student is not the one the run started from "
                                                 r"\(model\.safetensors\)"):
        sft.main(run_args(world, out, model=student, save_every=2, **extra) + ["--resume"])
    assert checkpoint.read_training_state(str(out / "train_state"))[1]["step"] == 2  # untouched
    sft.main(run_args(world, out, model=student, save_every=2, **extra) + ["--resume", "--force-resume"])
    assert (out / "model.safetensors").exists()


def test_a_finished_run_is_not_replaced_without_overwrite(world, tmp_path):  # noqa: F811
    """A fresh run into a folder holding a finished run is refused before anything is written; --overwrite
    removes the finished run's files first, so a full run after a LoRA run leaves no stale adapter/."""
    out = tmp_path / "out"
    sft.main(run_args(world, out, max_steps=2, eval_every=0, lora_rank=4, lora_save_adapter=True))
    assert (out / "adapter").is_dir()
    before = {name: os.path.getmtime(out / name) for name in ("model.safetensors", "metrics.jsonl", "sft_config.json")}
    with pytest.raises(common.ConfigError, match=r"holds a finished run .* add --overwrite to replace it"):
        sft.main(run_args(world, out, max_steps=3, eval_every=0))
    assert {name: os.path.getmtime(out / name) for name in before} == before
    sft.main(run_args(world, out, max_steps=3, eval_every=0) + ["--overwrite"])
    assert not (out / "adapter").exists()
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
    assert json.load(open(out / "sft_config.json"))["lora_rank"] == 0


def test_output_dir_that_is_the_model_is_refused(world, tmp_path):  # noqa: F811
    student = copy_student(world.student, tmp_path / "student")
    with pytest.raises(common.ConfigError, match=r"is the model this run starts from"):
        sft.main(run_args(world, student, model=student))
    assert load_file(os.path.join(student, "model.safetensors")).keys() == weights(world.student).keys()


HOLDER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import common
with common.hold_output(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_second_training_on_a_held_output_dir_is_refused(world, tmp_path):  # noqa: F811
    """While another process holds output_dir (as a running sft.py / rl.py does), a run into it exits with one
    line and writes nothing; once the holder is killed, the run goes ahead."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, ROOT, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = sft_cli(*run_args(world, out, max_steps=2, eval_every=0))
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(f"sft.py: error: {out}: in use by another run (pid ")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    r = sft_cli(*run_args(world, out, max_steps=2, eval_every=0))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").exists() and not os.path.exists(f"{out}.lock")


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    """A full disk or a kill mid-write leaves half a line at the end of metrics.jsonl: the resume drops it
    (and the steps after its checkpoint); a damaged line in the middle is one error naming the line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    checkpoint.open_metrics(str(path), 2).close()
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2: expected one JSON object with a \"step\""):
        checkpoint.open_metrics(str(path), 2)


def test_fsdp_resume_with_a_missing_rank_file_stops_every_rank(world, tmp_path):  # noqa: F811
    """A sharded state with rank 1's optimizer file gone: both ranks stop with the same one line (none
    waits in a collective for the other)."""
    out = tmp_path / "killed"
    args = run_args(world, out, grad_accum=1, parallel="fsdp", max_steps=4, eval_every=0, save_every=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py"]
    r = subprocess.run([*torchrun, *args, "--stop-after-steps=3"], cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    os.remove(out / "train_state" / "rank1.optimizer.safetensors")
    r = subprocess.run([*torchrun, *args, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("sft.py: error:")]
    assert len(errors) == 2 and "rank1.optimizer.safetensors missing" in errors[0] and errors[0] == errors[1], r.stderr[-3000:]
    assert f'File "{ROOT}' not in r.stderr  # no traceback from our code (torchrun prints its own ChildFailedError)


def test_an_option_added_after_a_run_started_is_no_change_while_it_keeps_its_default():
    """A run record written before an option existed lacks its key: resuming with the option at its
    default is the same run; set to anything else it is a change, named as one."""
    import rl
    defaults = checkpoint.config_defaults(rl.RLConfig)
    assert defaults["vote_pool"] == 0 and defaults["calibration_reward"] == 0.0 and defaults["lora_targets"][0] == "q_proj"
    saved = {"config": {"lr": 0.1}}
    record = {"config": {"lr": 0.1, "vote_pool": 0}, "inputs": {}}
    assert checkpoint.record_changes(saved, record, set(), defaults) == []
    assert checkpoint.record_changes(saved, record, set()) == ["vote_pool '(absent)' -> 0"]
    record["config"]["vote_pool"] = 16
    assert checkpoint.record_changes(saved, record, set(), defaults) == ["vote_pool 0 -> 16"]
    record["config"]["vote_pool"], record["config"]["lr"] = 0, 0.2
    assert checkpoint.record_changes(saved, record, set(), defaults) == ["lr 0.1 -> 0.2"]
