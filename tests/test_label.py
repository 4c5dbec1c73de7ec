"""label.py: the teacher-labelling job (resume, refusals, torchrun shards and their merge) and the
generic sampling CLI, end to end through its command line. The sampler itself: tests/test_rollout.py.
"""
import json
import os
import pytest
import re
import shutil
import subprocess
import sys

import common
import label
import rollout
from confprofile import load_taxonomy
from model import load_model
from test_rollout import make_chat_checkpoint


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("chat"))


def test_cli_round_trip(chat_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    records = [{"id": "a", "messages": [{"role": "user", "content": "the user watched"}]},
               {"id": 7, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "age"}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["--model", chat_checkpoint, "--prompts", str(prompts), "--samples", "3", "--max-new-tokens", "6",
            "--temperature", "0.8", "--seed", "5", "--out", str(out), "--progress", "false"]
    label.main(argv)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a", 7]
    # the same samples as calling the library directly with the same seed
    tok, model = common.load_tokenizer(chat_checkpoint), load_model(chat_checkpoint)
    stop = common.stop_ids_for(tok)
    direct = rollout.generate(model, [common.chat_prompt_ids(tok, r["messages"]) for r in records], rollout.SamplingParams(max_new_tokens=6, temperature=0.8, stop_ids=stop), n=3, seed=5)
    for line, group in zip(lines, direct):
        assert [s["text"] for s in line["samples"]] == [common.completion_text(tok, s, stop) for s in group]
        assert [s["finish_reason"] for s in line["samples"]] == [s.finish_reason for s in group]
    label.main(argv)  # a rerun with the same seed writes the same file
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines

    prompts.write_text(json.dumps(records[0]) + "\n" + json.dumps({"id": "b", "messages": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"prompts\.jsonl:2: messages"):
        label.main(argv)
    prompts.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"prompts\.jsonl:2: invalid JSON"):
        label.main(argv)


# -----------------------------------------------------------------------------
# Teacher labelling: restartable, one whole line per user

USERS = [{"user_id": f"u{i}", "behavior": {"watched": ["cooking videos", "stock market news"][: 1 + i % 2]},
          "demographic": {"age": str(20 + i)}} for i in range(5)]


def _labelled(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("teacher", ["checkpoint", "sim"])
def test_teacher_labelling_restarts_without_duplicates(teacher, chat_checkpoint, tmp_path):
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    teacher_arg = chat_checkpoint if teacher == "checkpoint" else "sim"
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    base = ["--teacher", teacher_arg, "--users", str(users), "--samples", "2", "--max-new-tokens", "5",
            "--seed", "1", "--batch-users", "2", "--progress", "false"]
    label.main(base + ["--out", str(full)])
    lines = _labelled(full)
    assert [x["user_id"] for x in lines] == [u["user_id"] for u in USERS]
    for x in lines:
        assert len(x["samples"]) == 2
        for s in x["samples"]:
            assert set(s) == {"text", "finish_reason"} and s["finish_reason"] in ("stop", "length")
    # a run killed while writing user 3 (the second of batch [u2, u3]): three whole lines and half of the fourth
    text = full.read_text(encoding="utf-8").splitlines(keepends=True)
    cut.write_text(text[0] + text[1] + text[2] + text[3][:17], encoding="utf-8")
    shutil.copy(str(full) + ".meta.json", str(cut) + ".meta.json")  # written before the first line
    label.main(base + ["--out", str(cut)])
    # u2's line is dropped and the batch [u2, u3] sampled again whole: exactly the uninterrupted run
    assert cut.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")
    label.main(base + ["--out", str(cut)])  # nothing left to do: nothing written
    assert cut.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")
    # a complete line we did not write is an error naming it, not something to skip or overwrite
    cut.write_text(text[0] + "not a teacher line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cut\.jsonl:2: expected a teacher output line"):
        label.main(base + ["--out", str(cut)])


def test_greedy_predictions_batch_many_users(chat_checkpoint, tmp_path, monkeypatch):
    """--samples 1 --temperature 0 (predictions for evaluate.py): users go to generate() many at a time,
    and batching does not change greedy answers."""
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    calls = []
    real_generate = rollout.generate

    def counting_generate(model, prompts, sampling, **kw):
        calls.append(len(prompts))
        return real_generate(model, prompts, sampling, **kw)

    monkeypatch.setattr(rollout, "generate", counting_generate)
    base = ["--teacher", chat_checkpoint, "--users", str(users), "--samples", "1", "--temperature", "0",
            "--max-new-tokens", "6", "--progress", "false"]
    label.main(base + ["--out", str(tmp_path / "a.jsonl")])
    assert calls == [5]
    label.main(base + ["--out", str(tmp_path / "b.jsonl"), "--batch-users", "2"])
    assert calls == [5, 2, 2, 1]
    assert _labelled(tmp_path / "a.jsonl") == _labelled(tmp_path / "b.jsonl")


def test_out_that_is_not_our_output_is_left_untouched(chat_checkpoint, tmp_path):
    """#13 item 3: --out naming a file label.py did not write, or one of its inputs, is refused before a byte
    of it changes (the old code cut "half-written last lines" first)."""
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"meeting notes\nremember: the teacher file is elsewhere")  # 55 bytes, no final newline
    base = ["--teacher", "sim", "--users", str(users), "--samples", "2", "--progress", "false"]
    for content in (notes.read_bytes(), b"", b"todo\n", b'{"user_id": "u0", "samples": []}\nhalf a line'):
        notes.write_bytes(content)
        if content:
            with pytest.raises(ValueError, match=r"notes\.txt"):
                label.main(base + ["--out", str(notes)])
            assert notes.read_bytes() == content
    assert not (tmp_path / "notes.txt.meta.json").exists()
    before = users.read_bytes()
    with pytest.raises(ValueError, match=r"--out is the input --users"):
        label.main(base + ["--out", str(users)])
    assert users.read_bytes() == before
    # generic mode replaces --out whole: only a file of its own, never its --prompts
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    notes.write_bytes(b"meeting notes\n")
    for out in (notes, prompts):
        before = out.read_bytes()
        with pytest.raises(ValueError, match=r"(notes\.txt:1: expected a sampler output line|--out is the input --prompts)"):
            label.main(["--model", chat_checkpoint, "--prompts", str(prompts), "--max-new-tokens", "2", "--out", str(out),
                          "--progress", "false"])
        assert out.read_bytes() == before


def test_teacher_resume_with_other_settings_is_refused(tmp_path):
    """#13 item 4: a teacher output records what produced it (<out>.meta.json); resuming it with other settings
    is refused with one line naming the keys, unless --force-resume (which keeps the earlier settings on record)."""
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    out = tmp_path / "teacher.jsonl"
    base = ["--teacher", "sim", "--users", str(users), "--out", str(out), "--progress", "false"]
    label.main(base + ["--samples", "2", "--seed", "1"])
    meta = json.loads((tmp_path / "teacher.jsonl.meta.json").read_text())
    assert meta["settings"]["teacher"] == "sim" and meta["settings"]["samples"] == 2 and meta["settings"]["seed"] == 1
    assert {"temperature", "top_k", "top_p", "max_new_tokens", "template_kwargs", "taxonomy_sha256",
            "users_sha256"} <= set(meta["settings"])
    written = out.read_bytes()
    out.write_bytes(written[:-40])  # killed while writing the last user
    with pytest.raises(ValueError, match=r"teacher\.jsonl: written with other settings \(samples 2 -> 4, seed 1 -> 0\)"):
        label.main(base + ["--samples", "4", "--seed", "0"])
    assert out.read_bytes() == written[:-40]  # refused before anything was cut
    users.write_text("".join(json.dumps(u) + "\n" for u in USERS[:4]))
    with pytest.raises(ValueError, match=r"\(users_sha256 "):
        label.main(base + ["--samples", "2", "--seed", "1"])
    users.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    label.main(base + ["--samples", "2", "--seed", "1"])  # same settings: resumes, the same file as one run
    assert out.read_bytes() == written
    label.main(base + ["--samples", "3", "--seed", "1", "--force-resume"])
    meta = json.loads((tmp_path / "teacher.jsonl.meta.json").read_text())
    assert meta["settings"]["samples"] == 3 and meta["earlier_settings"][0]["samples"] == 2
    # a teacher file from before settings were recorded: resumed only on request; still read by calibrate/evaluate
    (tmp_path / "teacher.jsonl.meta.json").unlink()
    with pytest.raises(ValueError, match=r"has no teacher\.jsonl\.meta\.json"):
        label.main(base + ["--samples", "3", "--seed", "1"])


def test_labelling_ignores_partial_labels(tmp_path):
    """#13 item 9: labels covering some dimensions only are valid (questionnaires have gaps); labelling
    does not use them."""
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps({**u, "labels": {"gender": "female", "age": None}}) + "\n" for u in USERS))
    out = tmp_path / "teacher.jsonl"
    label.main(["--teacher", "sim", "--users", str(users), "--samples", "2", "--out", str(out), "--progress", "false"])
    assert len(_labelled(out)) == len(USERS)


def run_script(*argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=root)


def cli_error(argv):
    """The one line label.py exits with (sys.exit(message): printed to stderr, exit status 1)."""
    with pytest.raises(SystemExit) as e:
        common.run_cli(label.main, "label.py", argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    return e.value.code


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    """#13 item 12: bad input gets one line (file:line: field: what was expected) and a non-zero exit."""
    users = tmp_path / "users.jsonl"
    users.write_text('{"user_id": "a"}\n{"user_id": "b", "behavior": {"watched": [[[1]]]}}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"user_id": "a"}\n')
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"user_id": "a", "behavior": ' + "[" * 100000 + "]" * 100000 + "}\n")
    cases = [
        (["--teacher", "sim", "--users", str(users), "--out", str(tmp_path / "t.jsonl")],
         r"users\.jsonl:2: behavior\.watched\[0\]: expected a string"),
        (["--teacher", str(tmp_path / "no-such-model"), "--users", str(good), "--out", str(tmp_path / "t2.jsonl")],
         r"no-such-model: model directory not found"),
        (["--teacher", "sim", "--users", str(good), "--out", str(good)], r"--out is the input --users"),
        (["--teacher", "sim", "--users", str(deep), "--out", str(tmp_path / "t3.jsonl")], r"deep\.jsonl:1: JSON nested too deeply"),
        (["--teacher", "sim", "--users", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t4.jsonl")],
         r"No such file or directory: .*missing\.jsonl"),
    ]
    for argv, message in cases:
        line = cli_error(argv)
        assert line.startswith("label.py: error: ") and re.search(message, line), line
    result = run_script("label.py", *cases[0][0])  # the real entry point: that line on stderr, exit status 1
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [cli_error(cases[0][0])]


# -----------------------------------------------------------------------------
# Labelling across processes (#16): batches r, r + K, ... per rank, one shard each, merged in file order

USERS9 = [{"user_id": f"u{i}", "behavior": {"watched": ["cooking videos", "stock market news", "gym"][: 1 + i % 3]},
           "demographic": {"age": str(20 + i)}} for i in range(9)]


def torchrun(*argv):
    """label.py under torchrun, 2 processes (gloo); --standalone: a free port of its own."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "label.py", *argv], cwd=root, capture_output=True, text=True, timeout=300)


def test_torchrun_checkpoint_shards_equal_one_process_after_a_kill(chat_checkpoint, tmp_path, capsys):
    """2 processes label a checkpoint teacher's batches into two shards; stopped part-way, one shard cut in
    the middle of a batch (a whole line of it and half the next), then resumed: the merged file is the
    one-process run's, byte for byte, so no user's samples depended on its rank or on the restart."""
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps(u) + "\n" for u in USERS9))
    base = ["--teacher", chat_checkpoint, "--users", str(users), "--samples", "2", "--max-new-tokens", "6",
            "--temperature", "1.0", "--seed", "3", "--batch-users", "2", "--progress", "false"]
    label.main(base + ["--out", str(tmp_path / "one.jsonl")])
    one = (tmp_path / "one.jsonl").read_text(encoding="utf-8")
    out = tmp_path / "two.jsonl"
    # batches [u0 u1] [u2 u3] [u4 u5] [u6 u7] [u8]: rank 0 takes 0, 2, 4; rank 1 takes 1, 3
    r = torchrun(*base, "--out", str(out), "--stop-after-batches", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not every shard" in r.stdout and not out.exists()
    shard0, shard1 = tmp_path / "two.jsonl.rank0-of2", tmp_path / "two.jsonl.rank1-of2"
    assert [x["user_id"] for x in _labelled(shard0)] == ["u0", "u1", "u4", "u5"]
    lines = shard1.read_text(encoding="utf-8").splitlines(keepends=True)
    assert [json.loads(x)["user_id"] for x in lines] == ["u2", "u3", "u6", "u7"]
    # whichever rank drew a batch, and in whatever process, its lines are the one-process run's
    assert set(lines + shard0.read_text(encoding="utf-8").splitlines(keepends=True)) <= set(one.splitlines(keepends=True))
    shard1.write_text("".join(lines[:3]) + lines[3][:30], encoding="utf-8")  # killed while writing u7
    r = torchrun(*base, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropping 1 whole line(s) of a batch" in r.stderr and f"merged 2 shards -> {out}" in r.stdout
    assert out.read_text(encoding="utf-8") == one
    assert sorted(os.listdir(tmp_path)) == ["one.jsonl", "one.jsonl.meta.json", "two.jsonl", "two.jsonl.meta.json",
                                            "users.jsonl"]
    assert json.loads((tmp_path / "two.jsonl.meta.json").read_text())["settings"] == \
        json.loads((tmp_path / "one.jsonl.meta.json").read_text())["settings"]
    # run again as rank 0 of 2 (in this process: this path returns before any collective): all done, and
    # shards a merge left behind (it stopped before removing them) are removed with their .meta.json
    shard0.write_text("x")
    (tmp_path / "two.jsonl.rank0-of2.meta.json").write_text("{}")
    args, _ = common.load_config(label.LabelConfig, base + ["--out", str(out)])
    taxonomy = load_taxonomy()
    label._label_shard(args, USERS9, taxonomy, label.teacher_settings(args, taxonomy),
                         label.existing_shards(str(out)), 0, 2)
    assert "complete, nothing to do" in capsys.readouterr().out and out.read_text(encoding="utf-8") == one
    assert not list(tmp_path.glob("*rank*"))


def test_merge_of_shards_and_its_refusals(tmp_path):
    """Shards labelled as ranks 0 and 1 of 2 (in this process), merged with --merge: the one-process file.
    Refused: a one-process run while shards exist, a shard missing a user, --merge without shards."""
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    base = ["--teacher", "sim", "--users", str(users), "--samples", "2", "--batch-users", "2", "--progress", "false"]
    label.main(base + ["--out", str(tmp_path / "one.jsonl")])
    out = tmp_path / "two.jsonl"
    args = label.LabelConfig(teacher="sim", users=str(users), out=str(out), samples=2, batch_users=2)
    taxonomy = load_taxonomy()
    settings = label.teacher_settings(args, taxonomy)
    for rank in (0, 1):  # batches [u0 u1] [u2 u3] [u4]: rank 0 takes 0 and 2, rank 1 takes 1
        shard = label.shard_path(str(out), rank, 2)
        done = label.open_output(shard, settings)
        label.label_users(label.SimulatedTeacher(taxonomy, 0, 1.0), USERS, taxonomy, shard, 2, batch_users=2,
                            progress=False, done=done, shard=(rank, 2))
    with pytest.raises(ValueError, match=r"two\.jsonl\.rank0-of2: a shard of a torchrun run"):
        label.main(base + ["--out", str(out)])
    shard1 = tmp_path / "two.jsonl.rank1-of2"
    lines = shard1.read_text().splitlines(keepends=True)
    assert [json.loads(x)["user_id"] for x in lines] == ["u2", "u3"]
    shard1.write_text(lines[0])
    with pytest.raises(ValueError, match=r"rank1-of2: expected user 'u3' \(batch 1\) next, got None"):
        label.main(base + ["--out", str(out), "--merge"])
    assert not out.exists()
    shard1.write_text("".join(lines))
    label.main(base + ["--out", str(out), "--merge"])
    assert out.read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not list(tmp_path.glob("*rank*"))
    with pytest.raises(ValueError, match=r"--merge needs the shards of one torchrun run \(0 sets found: none\)"):
        label.main(base + ["--out", str(out), "--merge"])


def test_resume_redoes_a_partly_written_batch_anywhere_in_the_file(chat_checkpoint, tmp_path):
    """A batch written in part that is followed by other batches' lines (a file whose lines came in
    another order) is dropped by rewriting the file, and sampled again whole: the set of lines is the
    uninterrupted run's."""
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    base = ["--teacher", chat_checkpoint, "--users", str(users), "--samples", "2", "--max-new-tokens", "5",
            "--temperature", "1.0", "--batch-users", "2", "--progress", "false"]
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    label.main(base + ["--out", str(full)])
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    cut.write_text(lines[0] + lines[2] + lines[3], encoding="utf-8")  # u0 of [u0 u1], then all of [u2 u3]
    shutil.copy(str(full) + ".meta.json", str(cut) + ".meta.json")
    label.main(base + ["--out", str(cut)])
    assert [x["user_id"] for x in _labelled(cut)] == ["u2", "u3", "u0", "u1", "u4"]
    assert sorted(cut.read_text(encoding="utf-8").splitlines()) == sorted(x.rstrip("\n") for x in lines)


# -----------------------------------------------------------------------------
# #23: what a resume, a merge or a second run on one output accepts must be what it claims to be
# (label.py and predict.py, which writes through label.py's resumable output)


def _users_file(tmp_path, users=USERS):
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(u) + "\n" for u in users))
    return path


def test_checkpoint_fingerprint_by_hand(tmp_path):
    """common.checkpoint_fingerprint: size and sha256 of config, weights, tokenizer and chat template files,
    nothing else; a missing folder, config.json or *.safetensors is an error naming the folder."""
    import hashlib
    files = {"config.json": b'{"model_type": "qwen3"}', "model-00001-of-00002.safetensors": b"w1" * 10,
             "model-00002-of-00002.safetensors": b"w2", "model.safetensors.index.json": b"{}",
             "tokenizer.json": b"tok", "chat_template.jinja": b"{{ messages }}", "generation_config.json": b"{}"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # a run's own files are not the checkpoint
    (tmp_path / "train_state").mkdir()
    expected = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    assert common.checkpoint_fingerprint(str(tmp_path)) == expected
    (tmp_path / "metrics.jsonl").write_text("{}\n{}\n")
    assert common.checkpoint_fingerprint(str(tmp_path)) == expected
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"w3")  # same size, other bytes
    assert common.checkpoint_fingerprint(str(tmp_path))["model-00002-of-00002.safetensors"] == \
        {"bytes": 2, "sha256": hashlib.sha256(b"w3").hexdigest()}
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: no config.json in this directory")):
        common.checkpoint_fingerprint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"nowhere: model directory not found"):
        common.checkpoint_fingerprint(str(tmp_path / "nowhere"))


def _replace_weights(ckpt):
    """Retrain in place: the same tensor names and shapes, other values, under the same path."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(ckpt, "model.safetensors")
    state = load_file(path)
    save_file({k: v + 0.01 for k, v in state.items()}, path, metadata={"format": "pt"})


@pytest.mark.parametrize("script", ["label", "predict"])
def test_resume_on_other_weights_under_the_same_path_is_refused(script, tmp_path):
    """#23 class 1: the recorded settings hold the checkpoint's fingerprint, not only its path: after the
    weights were replaced under the same folder, a resume is refused naming the file that differs, and the
    output is left as it was; the tokenizer and chat template count too."""
    import predict
    ckpt = make_chat_checkpoint(tmp_path / "ckpt")
    users = _users_file(tmp_path)
    out = tmp_path / "out.jsonl"
    run = label.main if script == "label" else predict.main
    flag = "--teacher" if script == "label" else "--model"
    base = [flag, ckpt, "--users", str(users), "--max-new-tokens", "4", "--batch-users", "2", "--out", str(out),
            "--progress", "false"]
    if script == "label":
        run(base + ["--stop-after-batches", "1"])
    else:
        run(base)
        out.write_bytes(out.read_bytes()[:-30])  # killed while writing the last user
    before, meta = out.read_bytes(), (tmp_path / "out.jsonl.meta.json").read_text()
    _replace_weights(ckpt)
    with pytest.raises(ValueError, match=rf"out\.jsonl: written with other settings \({flag[2:]}_fingerprint\."
                                         r"model\.safetensors\.sha256 "):
        run(base)
    assert out.read_bytes() == before
    recorded = json.loads(meta)["settings"][f"{flag[2:]}_fingerprint"]
    assert set(recorded) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                             "tokenizer_config.json", "chat_template.jinja"}
    run(base + ["--force-resume"])  # on request: resumed, the earlier fingerprint kept on record
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["earlier_settings"][0][f"{flag[2:]}_fingerprint"] == recorded
    with open(os.path.join(ckpt, "chat_template.jinja"), "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match=rf"\({flag[2:]}_fingerprint\.chat_template\.jinja\.bytes "):
        run(base)


def _holder(path):
    """Another process holding `path` (common.hold_output) until it is killed; returns once it holds it:
    the handshake is its line on the pipe, no sleep."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, common\nwith common.hold_output(sys.argv[1]):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=root, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_run_on_a_held_output_is_refused_until_the_holder_dies(tmp_path):
    """#23 class 3: two real processes. While one holds an output, label.py and predict.py on it exit 1
    with one line naming it and the holder's pid, and write nothing; after a SIGKILL of the holder (its
    lock file left behind) the next run proceeds, and leaves no lock file."""
    users = _users_file(tmp_path)
    out = tmp_path / "out.jsonl"
    holder = _holder(out)
    try:
        for argv in (["label.py", "--teacher", "sim", "--samples", "2"], ["predict.py", "--model", "sim"]):
            r = run_script(*argv, "--users", str(users), "--out", str(out), "--progress", "false")
            assert r.returncode == 1 and r.stderr.strip().splitlines() == [
                f"{argv[0]}: error: {out}: in use by another run (pid {holder.pid}, holding out.jsonl.lock); expected "
                "one process per output: wait for it to end, or choose another output"], r.stderr
            assert not out.exists() and not (tmp_path / "out.jsonl.meta.json").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in it
        holder.wait()
    assert (tmp_path / "out.jsonl.lock").exists()
    r = run_script("label.py", "--teacher", "sim", "--samples", "2", "--users", str(users), "--out", str(out),
                   "--progress", "false")
    assert r.returncode == 0, r.stderr
    assert [x["user_id"] for x in _labelled(out)] == [u["user_id"] for u in USERS]
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.jsonl.meta.json", "users.jsonl"]


def test_the_output_is_held_for_the_whole_run(tmp_path, monkeypatch):
    """#23 class 3: while label.py writes --out (one process) and while predict.py writes its profiles, another
    process cannot take the output: asked from inside the teacher's answer() call, mid-run."""
    import predict
    users = _users_file(tmp_path)
    seen = []
    real_answer = label.SimulatedTeacher.answer

    def answer(self, message_lists, n, seeds):
        code = "import sys, common\nwith common.hold_output(sys.argv[1]):\n    pass\n"
        r = subprocess.run([sys.executable, "-c", code, seen[-1]], capture_output=True, text=True, timeout=120,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        seen.append(r.returncode != 0 and "in use by another run" in r.stderr)
        return real_answer(self, message_lists, n, seeds)

    monkeypatch.setattr(label.SimulatedTeacher, "answer", answer)
    for run, argv in ((label.main, ["--teacher", "sim", "--samples", "2"]), (predict.main, ["--model", "sim"])):
        out = str(tmp_path / f"{run.__module__}.jsonl")
        seen.append(out)
        run(argv + ["--users", str(users), "--out", out, "--batch-users", "5", "--progress", "false"])
        assert seen.pop() is True and seen.pop() == out
        assert not os.path.exists(out + ".lock")


def test_torchrun_on_a_held_output_stops_on_every_rank(tmp_path):
    """#23 class 3 under torchrun: rank 0 cannot hold --out, the ranks agree, and both stop (no hang, no shard)."""
    users = _users_file(tmp_path)
    out = tmp_path / "out.jsonl"
    holder = _holder(out)
    try:
        r = torchrun("--teacher", "sim", "--users", str(users), "--samples", "2", "--out", str(out), "--progress",
                     "false")
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode != 0 and f"{out}: in use by another run (pid {holder.pid}" in r.stderr
    assert "another process of this torchrun run could not hold its output" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl.lock", "users.jsonl"]


def test_resume_checks_the_content_of_each_line(tmp_path):
    """#23 class 5: a finished teacher file holding a line that calibrate.py / evaluate.py would refuse
    (a user not in --users, an answer that is not text, a repeated key) is refused naming file, line and
    field, before a byte changes; the same for predict.py's profiles (a confidence of 1e9)."""
    import predict
    users = _users_file(tmp_path)
    out = tmp_path / "teacher.jsonl"
    base = ["--teacher", "sim", "--users", str(users), "--samples", "2", "--out", str(out), "--progress", "false"]
    label.main(base)
    good = out.read_text()
    lines = good.splitlines(keepends=True)
    stranger = json.dumps({"user_id": "stranger", "samples": [{"text": "{}", "finish_reason": "stop"}]}) + "\n"
    bad = dict(json.loads(lines[1]), samples=[{"text": 5, "finish_reason": "stop"}])
    for content, message in ((good + stranger, r"teacher\.jsonl:6: user_id: 'stranger' is not one of the users"),
                             (lines[0] + json.dumps(bad) + "\n", r"teacher\.jsonl:2: samples\[0\]: expected"),
                             (lines[0] + lines[1][:-2] + ', "user_id": "u1"}\n',
                              r"teacher\.jsonl:2: user_id: duplicate key")):
        out.write_text(content)
        with pytest.raises(ValueError, match=message):
            label.main(base)
        assert out.read_text() == content
    # profiles: the line checks of evaluate.py's reader
    profiles = tmp_path / "profiles.jsonl"
    pbase = ["--model", "sim", "--users", str(users), "--out", str(profiles), "--progress", "false"]
    predict.main(pbase)
    lines = profiles.read_text().splitlines(keepends=True)
    record = json.loads(lines[2])
    record["profile"]["age"]["confidence"] = 1e9
    for content, message in (("".join(lines[:2]) + json.dumps(record) + "\n",
                              r"profiles\.jsonl:3: profile\.age\.confidence: expected a number 0\.\.10"),
                             ("".join(lines) + lines[0].replace('"u0"', '"stranger"'),
                              r"profiles\.jsonl:6: user_id: 'stranger' is not one of the users")):
        profiles.write_text(content)
        with pytest.raises(ValueError, match=message):
            predict.main(pbase)
        assert profiles.read_text() == content


def test_merge_refuses_an_invalid_shard_line_and_keeps_the_shards(tmp_path):
    """#23 class 5: a shard line whose payload is invalid (a sample without text) is refused by --merge naming
    the shard, line and field; no output is written and both shards stay as they were."""
    users = _users_file(tmp_path)
    out = tmp_path / "two.jsonl"
    args = label.LabelConfig(teacher="sim", users=str(users), out=str(out), samples=2, batch_users=2)
    taxonomy = load_taxonomy()
    settings = label.teacher_settings(args, taxonomy)
    for rank in (0, 1):
        shard = label.shard_path(str(out), rank, 2)
        done = label.open_output(shard, settings)
        label.label_users(label.SimulatedTeacher(taxonomy, 0, 1.0), USERS, taxonomy, shard, 2, batch_users=2,
                          progress=False, done=done, shard=(rank, 2))
    shard1 = tmp_path / "two.jsonl.rank1-of2"
    lines = shard1.read_text().splitlines(keepends=True)
    broken = dict(json.loads(lines[1]), samples=[{"finish_reason": "stop"}])
    shard1.write_text(lines[0] + json.dumps(broken) + "\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"two\.jsonl\.rank1-of2:2: samples\[0\]: expected"):
        label.main(["--teacher", "sim", "--users", str(users), "--samples", "2", "--batch-users", "2", "--out",
                    str(out), "--merge", "--progress", "false"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_predict_refuses_a_malformed_thresholds_file_in_one_line(tmp_path):
    """#23: thresholds.json as predict.py's input: a repeated key (the last would win silently), NaN, or nesting
    too deep is one line naming the file; nothing is written."""
    import predict
    users = _users_file(tmp_path)
    taus = {d: {"tau": 5} for d in load_taxonomy()["dimensions"]}
    th = tmp_path / "thresholds.json"
    cases = [('{"dimensions": {"gender": {"tau": 9}, ' + json.dumps({"dimensions": taus})[16:],
              r"thresholds\.json: gender: duplicate key in one object"),
             (json.dumps({"dimensions": taus}).replace('"tau": 5}', '"tau": 5, "tau": 0}', 1),
              r"thresholds\.json: tau: duplicate key"),
             (json.dumps({"dimensions": taus, "note": float("nan")}), r"thresholds\.json: invalid JSON number NaN"),
             ('{"dimensions": ' + "[" * 100000 + "]" * 100000 + "}", r"thresholds\.json: JSON nested too deeply")]
    for text, message in cases:
        th.write_text(text)
        with pytest.raises(SystemExit) as e:
            common.run_cli(predict.main, "predict.py", ["--model", "sim", "--users", str(users), "--thresholds", str(th),
                                                        "--out", str(tmp_path / "p.jsonl"), "--progress", "false"])
        assert "\n" not in e.value.code and re.search(message, e.value.code), e.value.code
        assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("script", ["label", "predict"])
def test_a_checkpoint_without_tokenizer_or_chat_template_is_named(script, tmp_path):
    """#23 class 7: a checkpoint folder that is missing, or has weights but no tokenizer, or a tokenizer but no
    chat template: one line naming the folder, before any weights load."""
    import predict
    users = _users_file(tmp_path)
    ckpt = make_chat_checkpoint(tmp_path / "ckpt")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(ckpt, name), bare / name)
    os.remove(os.path.join(ckpt, "chat_template.jinja"))
    flag = "--teacher" if script == "label" else "--model"
    main = label.main if script == "label" else predict.main
    for path, message in ((tmp_path / "missing", r"missing: model directory not found"),
                          (bare, r"bare: no tokenizer \(tokenizer\.json, tokenizer\.model, vocab\.json\) in this "
                                 "directory"),
                          (ckpt, r"ckpt: no chat template")):
        with pytest.raises(SystemExit) as e:
            common.run_cli(main, f"{script}.py", [flag, str(path), "--users", str(users), "--out",
                                                  str(tmp_path / "o.jsonl"), "--progress", "false"])
        assert "\n" not in e.value.code and re.search(message, e.value.code), e.value.code
