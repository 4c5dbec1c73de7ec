"""Untrusted inputs outside the trainers and the labelling job: a checkpoint whose config.json asks for
more than its safetensors hold, a truncated safetensors file, config keys of the wrong type, a tokenizer
larger than the embedding, deeply nested JSON, a read-only output folder, the temp files of killed atomic
writes, the pipeline's skip of a stage whose output was damaged, evaluate.py's leftover thresholds.json
and the loss panel of a diverged run. Each is one line naming the file and the field, or a redo that says
why, never a traceback, an allocation of what the checkpoint cannot back, or a silent wrong result."""
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_checkpoints import FAMILIES, make_checkpoint

import common
import model as model_py
from model import ModelArgs, Transformer, check_tokenizer_fits, expected_shapes, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: make_checkpoint(f, root / f) for f in ("qwen3", "llama3")}


def copy_checkpoint(src, dst, **config_changes):
    """A copy of checkpoint `src` in `dst` with config.json keys changed (None: the key removed)."""
    os.makedirs(dst, exist_ok=True)
    config = json.load(open(os.path.join(src, "config.json")))
    for k, v in config_changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(src, "model.safetensors"), "rb") as f:
        data = f.read()
    with open(os.path.join(dst, "model.safetensors"), "wb") as f:
        f.write(data)
    return str(dst)


def one_line_error(fn, *args):
    """The message run_cli would print for fn(*args) (it must fail with a user error), checked to be one line."""
    with pytest.raises(SystemExit) as e:
        common.run_cli(lambda argv: fn(*args), "prog", [])
    message = str(e.value.code)
    assert message.startswith("prog: error: ") and "\n" not in message, message
    return message

# -----------------------------------------------------------------------------
# model.py: config.json against the safetensors headers, before anything is built


def test_expected_shapes_are_the_built_models(checkpoints):
    """expected_shapes (computed from ModelArgs, nothing built) is the built model's state_dict, per family."""
    for family in FAMILIES:
        from tiny_checkpoints import _family_config
        args = ModelArgs.from_hf_config(_family_config(family, {}).to_dict())
        with torch.device("meta"):
            built = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
        if args.tie_embeddings:
            del built["lm_head.weight"]
        assert expected_shapes(args) == built, family


@pytest.mark.parametrize("change, expected", [
    ({"head_dim": 10 ** 12}, r"tensor model\.layers\.0\.self_attn\.q_proj\.weight has shape \(96, 64\), config\.json "
                             r"implies \(4000000000000, 64\)"),
    ({"num_hidden_layers": 10 ** 9}, r"config\.json: num_hidden_layers 1000000000, but the safetensors hold 2 layer\(s\)"),
    ({"vocab_size": 10 ** 12}, r"model\.embed_tokens\.weight has shape \(256, 64\), config\.json implies \(1000000000000, 64\)"),
    ({"intermediate_size": 10 ** 11}, r"mlp\.gate_proj\.weight has shape \(128, 64\)"),
])
def test_config_larger_than_its_weights_is_refused_before_anything_is_built(checkpoints, tmp_path, monkeypatch,
                                                                             change, expected):
    """head_dim 10¹² or num_hidden_layers 10⁹ beside small weights: refused from the safetensors headers,
    before a Transformer (its RoPE table, its blocks) is built or a tensor is read."""
    path = copy_checkpoint(checkpoints["qwen3"], tmp_path / "ckpt", **change)

    def must_not_run(*args, **kwargs):
        raise AssertionError("built or read before the config was compared with the safetensors headers")
    monkeypatch.setattr(model_py.Transformer, "__init__", must_not_run)
    monkeypatch.setattr(model_py, "rope_inv_freq", must_not_run)
    monkeypatch.setattr(model_py, "load_file", must_not_run)
    message = one_line_error(load_model, path)
    assert path in message
    import re
    assert re.search(expected, message), message


def test_truncated_or_damaged_safetensors_is_one_line_naming_the_file(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["qwen3"], tmp_path / "ckpt")
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    n = int.from_bytes(data[:8], "little")
    cases = [
        (data[: len(data) // 2], rf"its header promises {len(data) - 8 - n} bytes of tensor data, it holds "
                                  rf"{len(data) // 2 - 8 - n}"),  # a half-copied file
        (data[:4], r"4 bytes, no header"),
        (data[: 8 + n // 2], rf"a header of {n} bytes"),  # cut inside the header
        (data[:8] + b"[" * n + data[8 + n:], r"its header is not a JSON object"),  # nested, not an object
        (data[:8] + data[8:8 + n].replace(b'"F32"', b'"F99"', 1) + data[8 + n:], r"dtype 'F99'"),
    ]
    for damaged, expected in cases:
        with open(weights, "wb") as f:
            f.write(damaged)
        message = one_line_error(load_model, path)
        assert f"{weights}: truncated or damaged safetensors file" in message
        import re
        assert re.search(expected, message), message
    with open(weights, "wb") as f:  # a header whose shape does not match its data: [96, 64] floats in 4 bytes
        header = json.loads(data[8:8 + n])
        name = "model.layers.0.self_attn.q_proj.weight"
        begin = header[name]["data_offsets"][0]
        header[name]["data_offsets"] = [begin, begin + 4]
        text = json.dumps(header).encode()
        f.write(len(text).to_bytes(8, "little") + text + data[8 + n:])
    assert f"tensor {name}: dtype 'F32', shape [96, 64] and data_offsets" in one_line_error(load_model, path)


@pytest.mark.parametrize("change, expected", [
    ({"tie_word_embeddings": "false"}, 'config.json: tie_word_embeddings: expected true or false, got "false"'),
    ({"hidden_size": None}, "config.json: hidden_size: missing; expected an integer"),
    ({"num_attention_heads": 4.0}, "config.json: num_attention_heads: expected an integer, got 4.0"),
    ({"num_hidden_layers": True}, "config.json: num_hidden_layers: expected an integer, got true"),
    ({"num_hidden_layers": 0}, "config.json: num_hidden_layers: expected an integer > 0, got 0"),
    ({"rms_norm_eps": "1e-6"}, 'config.json: rms_norm_eps: expected a number, got "1e-6"'),
    ({"attention_bias": 1}, "config.json: attention_bias: expected true or false, got 1"),
    ({"num_key_value_heads": 3}, "config.json: num_key_value_heads: expected a divisor of num_attention_heads 4, got 3"),
    ({"head_dim": 23}, "config.json: head_dim: expected an even number (RoPE rotates pairs), got 23"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}},
     'config.json: rope_parameters.rope_theta: expected a number, got "big"'),
    ({"architectures": "Qwen3ForCausalLM"}, 'config.json: architectures: expected a JSON list, got "Qwen3ForCausalLM"'),
])
def test_config_keys_of_the_wrong_type_are_one_line_naming_file_and_key(checkpoints, tmp_path, change, expected):
    """bool("false") is True: a string where a boolean belongs would have tied the embeddings silently."""
    path = copy_checkpoint(checkpoints["qwen3"], tmp_path / "ckpt", **change)
    message = one_line_error(load_model, path)
    assert message == f"prog: error: {path}/{expected}"


def test_llama3_rope_scaling_fields_are_checked(checkpoints, tmp_path):
    config = json.load(open(os.path.join(checkpoints["llama3"], "config.json")))
    key = "rope_parameters" if "rope_parameters" in config else "rope_scaling"
    rope = {k: v for k, v in config[key].items() if k != "low_freq_factor"}
    path = copy_checkpoint(checkpoints["llama3"], tmp_path / "ckpt", **{key: rope})
    assert one_line_error(load_model, path) == f"prog: error: {path}/config.json: {key}.low_freq_factor: missing; expected a number"
    assert load_model(checkpoints["llama3"]).args.rope_scaling["low_freq_factor"] == 1.0  # the real file loads


def test_deeply_nested_or_invalid_config_json_is_one_line(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["qwen3"], tmp_path / "ckpt")
    config = os.path.join(path, "config.json")
    for text, expected in (("[" * 100000 + "]" * 100000, "JSON nested too deeply"),
                           ('{"model_type": "qwen3",\n "vocab_size": }', "line 2: invalid JSON at column 16"),
                           ("[1, 2]", "expected a JSON object of model settings")):
        with open(config, "w") as f:
            f.write(text)
        message = one_line_error(load_model, path)
        assert expected in message and path in message, message


def test_tokenizer_larger_than_the_embedding_is_refused(checkpoints):
    """One check (model.check_tokenizer_fits) for every script that loads a tokenizer and a model: a token
    id at or past vocab_size is an index error at the first prefill (a device assert on a GPU)."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    vocab = {f"t{i}": i for i in range(250)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    model = load_model(checkpoints["qwen3"])  # vocab_size 256
    assert check_tokenizer_fits(tok, model, "ckpt") == 250
    tok.add_special_tokens({"additional_special_tokens": [f"<extra{i}>" for i in range(6)]})
    assert check_tokenizer_fits(tok, model.args, "ckpt") == 256  # exactly fits
    tok.add_special_tokens({"additional_special_tokens": ["<one_too_many>"]})
    message = one_line_error(check_tokenizer_fits, tok, model, "some/ckpt")
    assert message == ("prog: error: some/ckpt: the tokenizer has 257 token ids but the model's embedding has 256 rows "
                       "(vocab_size of config.json); expected a tokenizer no larger than the embedding (the "
                       "checkpoint's own tokenizer files)")
    with pytest.raises(IndexError):  # what the check prevents
        model(torch.tensor([[256]]))

# -----------------------------------------------------------------------------
# common.py: the temp files of killed atomic writes, a read-only output folder

WRITER = """
import sys
sys.path.insert(0, {root!r})
import common
with common.atomic_writer({target!r}) as f:
    f.write("half of it")
    f.flush()
    print("writing", flush=True)
    sys.stdin.readline()  # until the test says (or the process is killed)
    f.write(" and the rest")
print("done", flush=True)
"""


def start_writer(target):
    """A process inside common.atomic_writer(target), its temp file written and open; returns it once there."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT, target=str(target))], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == "writing\n"
    return proc


def temps(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith(common.TEMP_PREFIX))


def test_a_killed_atomic_write_leaves_its_temp_only_until_the_next_write_of_that_file(tmp_path):
    target, other = tmp_path / "sft.jsonl", tmp_path / "audit.jsonl"
    target.write_text("old\n")
    killed = start_writer(target)
    killed.kill()
    killed.wait()
    left = temps(tmp_path)
    assert len(left) == 1 and left[0].endswith("-sft.jsonl") and target.read_text() == "old\n"  # what a kill leaves
    common.atomic_write_text(other, "x\n")  # another file's write leaves it alone
    assert temps(tmp_path) == left
    common.atomic_write_text(target, "new\n")  # the next write of the same file removes it
    assert temps(tmp_path) == [] and target.read_text() == "new\n"
    assert sorted(os.listdir(tmp_path)) == ["audit.jsonl", "sft.jsonl"]


def test_a_live_writers_temp_is_never_removed(tmp_path):
    """Two writers of one file: the second one's write does not remove the first one's temp (it is
    locked while its process lives), so the first one's rename still succeeds: the last rename wins."""
    target = tmp_path / "metrics.json"
    live = start_writer(target)
    mine = temps(tmp_path)
    common.atomic_write_text(target, "second\n")
    assert temps(tmp_path) == mine and target.read_text() == "second\n"
    assert common.remove_stale_temps(str(tmp_path), "metrics.json") == [] and temps(tmp_path) == mine
    out, _ = live.communicate("go\n")
    assert live.returncode == 0 and out == "done\n"
    assert target.read_text() == "half of it and the rest" and temps(tmp_path) == []


def test_a_read_only_output_folder_is_one_line_naming_the_output(tmp_path, monkeypatch):
    """(Simulated: the tests may run as root, whom permissions do not stop.) calibrate.py's SFT set, an
    atomic write and a checkpoint into a folder that refuses new files: one line naming the output and
    the reason, no traceback; an error that is not about writing passes unchanged."""
    import errno
    import calibrate
    from test_calibrate import TAXONOMY, TEACHER  # the hand-made teacher file of test_calibrate
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(ro)) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only_open)
    message = one_line_error(common.atomic_write_text, str(ro / "thresholds.json"), "{}")
    assert message.startswith(f"prog: error: {ro / 'thresholds.json'}: cannot write it: Permission denied ({ro}/.tmp-")
    assert message.endswith("-thresholds.json); expected a writable folder with room for it")
    args = ModelArgs(model_type="qwen3", vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                     intermediate_size=32, qk_norm=True, tie_embeddings=True)
    message = one_line_error(model_py.save_model, Transformer(args), str(ro))
    assert message == (f"prog: error: {ro}/model.safetensors: cannot write it: Permission denied "
                       f"({ro}/.tmp-model.safetensors); expected a writable folder with room for it")
    (tmp_path / "tax.json").write_text(json.dumps(TAXONOMY))
    (tmp_path / "users.jsonl").write_text("".join(json.dumps({"user_id": uid}) + "\n" for uid, _ in TEACHER))
    (tmp_path / "teacher.jsonl").write_text("".join(json.dumps({"user_id": uid, "samples": [{"text": t} for t in texts]})
                                                    + "\n" for uid, texts in TEACHER))
    with pytest.raises(SystemExit) as e:
        common.run_cli(calibrate.main, "calibrate.py", ["--samples", str(tmp_path / "teacher.jsonl"), "--users",
                                                         str(tmp_path / "users.jsonl"), "--taxonomy",
                                                         str(tmp_path / "tax.json"), "--out", str(ro / "sft.jsonl")])
    assert str(e.value.code).startswith(f"calibrate.py: error: {ro}/sft.jsonl: cannot write it: Permission denied")
    with pytest.raises(OSError) as e:  # not about writing an output: unchanged
        with common.unwritable_as_data_error("x"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "y")
    assert not isinstance(e.value, common.DataError)

# -----------------------------------------------------------------------------
# pipeline.py: a stage is skipped only when its files are the ones it wrote

STAGE = """
import sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
lines = open(args["--in"]).read().splitlines() if "--in" in args else [f"user {i}" for i in range(10)]
runs = open(args["--count"]).read() if "--count" in args else ""
with open(args["--out"], "w") as f:
    f.write("".join(f"{line} {runs}\\n" for line in lines))
print("ran", args["--out"])
"""


def test_pipeline_skips_a_stage_only_when_its_files_are_the_ones_it_wrote(tmp_path, capsys):
    """Cut a stage's output to half (or change an earlier stage's output, its input) and the pipeline
    runs it again, saying why in one line, instead of going on with half of it."""
    import pipeline
    script, out, count = tmp_path / "stage.py", tmp_path / "run", tmp_path / "count.txt"
    script.write_text(STAGE)
    count.write_text("a")
    out.mkdir()
    teacher, sft = out / "teacher.jsonl", out / "sft.jsonl"

    def run_both():
        log = []
        pipeline.run_stage("teacher", [str(script), "--count", str(count), "--out", str(teacher)], str(out), log)
        pipeline.run_stage("calibrate", [str(script), "--in", str(teacher), "--out", str(sft)], str(out), log)
        return capsys.readouterr().out

    run_both()
    marker = json.loads((out / ".done" / "calibrate").read_text())
    assert list(marker["outputs"]) == [str(sft)] and list(marker["inputs"]) == [str(teacher)]
    assert marker["outputs"][str(sft)]["size"] == 10 * len("user 0 a \n")
    assert run_both().count("[skip]") == 2  # nothing changed
    whole = teacher.read_text()
    teacher.write_text("".join(whole.splitlines(keepends=True)[:5]))  # half its users
    count.write_text("b")  # the teacher's answers come out otherwise this time
    printed = run_both()
    assert (f"[redo] teacher: its output {teacher} changed ({len(whole)} -> {len(whole) // 2} bytes, sha256 "
            in printed) and "since it finished; running it again" in printed
    assert f"[redo] calibrate: its input {teacher} changed (same size, sha256" in printed  # the new answers
    assert sft.read_text() == "".join(f"user {i} b \n" for i in range(10)) and printed.count("[skip]") == 0
    sft.unlink()
    printed = run_both()
    assert printed.count("[skip]") == 1 and f"[redo] calibrate: its output {sft} is gone" in printed
    marker = out / ".done" / "teacher"  # a marker written before the fingerprints were recorded
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k not in ("outputs", "inputs")}))
    assert "[redo] teacher: its marker records no fingerprints of its files (an older marker)" in run_both()

# -----------------------------------------------------------------------------
# Leftovers: evaluate.py's earlier thresholds.json, a diverged run's loss panel


def test_evaluate_without_a_target_removes_an_earlier_thresholds_json(tmp_path, capsys):
    """An earlier run's thresholds.json beside this run's metrics would pass for thresholds chosen on these
    predictions: a run that chooses none removes it (once its own files are written), unless it is the
    --thresholds file this run applies."""
    import evaluate
    from test_thresholds import TAX, USERS, level_predictions
    tax, data, preds, out = tmp_path / "tax.json", tmp_path / "dev.jsonl", tmp_path / "preds.jsonl", tmp_path / "eval"
    tax.write_text(json.dumps(TAX))
    data.write_text("".join(json.dumps(u) + "\n" for u in USERS))
    preds.write_text("".join(json.dumps({"user_id": k, "profile": v}) + "\n" for k, v in level_predictions().items()))
    common_args = ["--predictions", str(preds), "--data", str(data), "--taxonomy", str(tax), "--out", str(out)]
    evaluate.main(common_args + ["--target-precision", "0.5"])
    chosen = out / "thresholds.json"
    assert json.loads(chosen.read_text())["dimensions"]["a"]["tau"] == 4
    evaluate.main(common_args + ["--thresholds", str(chosen)])  # applying it to the folder it is in: kept
    assert chosen.exists() and "removed" not in capsys.readouterr().out
    m = evaluate.main(common_args)  # no target: the earlier choice goes
    assert not chosen.exists() and "thresholds" not in m and (out / "metrics.json").exists()
    assert f"removed {chosen}: an earlier run's thresholds" in capsys.readouterr().out


def test_a_diverged_run_says_so_on_its_loss_panel_and_in_the_output(tmp_path, capsys):
    import plots
    run = tmp_path / "sft"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": float("nan"), "lr": 1e-3}) + "\n"
                                               for s in range(1, 6)))
    plots.draw_training_curves(str(run))
    printed = capsys.readouterr().out
    assert f"{run}/metrics.jsonl: train loss: NaN or infinite at every step (the run diverged there" in printed
    fig = plots.training_curves_figure(plots.read_metrics(str(run / "metrics.jsonl")))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["train loss: NaN or infinite at every step"] and not fig.axes[0].lines
    # NaN at some steps: the finite ones are drawn (and smoothed) and the panel says where the others are
    records = [{"step": s, "loss": float("nan") if s in (7, 30) else 1.0 / s} for s in range(1, 51)]
    ax = plots.training_curves_figure(records).axes[0]
    assert [t.get_text() for t in ax.texts] == ["train loss: NaN or infinite at 2 of 50 steps, first at step 7"]
    assert len(ax.lines) == 2 and all(v == v for line in ax.lines for v in line.get_ydata())  # raw + average, no NaN
    assert len(ax.lines[0].get_xdata()) == 48
