"""parallel: fsdp (FSDP2) for sft.py and rl.py, on CPU with gloo and 2 processes: the same losses, gradient
norms and final weights as one process (fp32 tolerance), a sharded state that resumes bit-exactly, and a
resume in another layout refused naming the key.

Why the gradient norm is compared: AdamW is nearly blind to a uniform scale of the gradient, so a
reduction that sums where it should average (gloo's AVG under fully_shard, pytorch issue 162338), or
the reverse, would leave losses and weights close; the logged pre-clip norm doubles or halves."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import distributed
import rl
import rollout
import sft
import test_rl
from test_rl import read_metrics as rl_metrics, toy_config, toy_model
from test_sft import read_metrics, run_args, weights, world  # noqa: F401  (world: the SFT fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*args, timeout=240):
    # --standalone: a free port of its own, so that concurrent test runs on one machine never clash
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_sft_fsdp_two_processes_match_one_and_resume_bit_exactly(world):  # noqa: F811
    """The global batch of 8 chats is cut into the same 2 length-sorted micro-batches either way: one
    process takes both (grad_accum 2), each of the 2 FSDP ranks one; every token's loss is divided by the
    global batch's answer-token count, so the summed gradients are the same up to summation order."""
    one, two, killed = world.dir / "fsdp_one", world.dir / "fsdp_two", world.dir / "fsdp_killed"
    # Adam divides by sqrt(v): where a gradient is ~eps, float summation order moves the update by up to
    # ~lr, so a small lr keeps the comparison about the gradients, not Adam's amplification of noise.
    args = dict(max_steps=4, eval_every=2, lr=1e-4, warmup_steps=1, save_every=2)
    sft.main(run_args(world, one, grad_accum=2, **args))
    torchrun("sft.py", *run_args(world, two, grad_accum=1, parallel="fsdp", **args))
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys() and not (two / "train_state").exists()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
    init = load_file(os.path.join(world.student, "model.safetensors"))
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-4  # the updates moved far more than that
    ma, mb = read_metrics(one), read_metrics(two)
    assert [r["grad_norm"] for r in ma] == pytest.approx([r["grad_norm"] for r in mb], rel=1e-4)  # x2 / x0.5 fails
    assert [r["loss"] for r in ma] == pytest.approx([r["loss"] for r in mb], abs=1e-5)
    assert [r["eval_loss"] for r in ma if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in mb if "eval_loss" in r], abs=1e-5)

    # killed after step 3: the step-2 state is one file set per rank, and its index says who holds what
    torchrun("sft.py", *run_args(world, killed, grad_accum=1, parallel="fsdp", stop_after_steps=3, **args))
    state_dir = killed / "train_state"
    assert sorted(os.listdir(state_dir)) == sorted(
        [f"rank{r}.{kind}" for r in (0, 1) for kind in ("json", "model.safetensors", "optimizer.safetensors",
                                                         "rng.safetensors")] + ["state.json"])
    state = json.load(open(state_dir / "state.json"))
    assert state["step"] == 2 and state["layout"] == {"parallel": "fsdp", "world_size": 2}
    vocab = init["model.embed_tokens.weight"].shape[0]
    assert state["tensors"]["model.embed_tokens.weight"]["rows"] == [[0, (vocab + 1) // 2], [(vocab + 1) // 2, vocab]]
    shards = [load_file(state_dir / f"rank{r}.model.safetensors") for r in (0, 1)]
    assert shards[0]["model.embed_tokens.weight"].shape[0] + shards[1]["model.embed_tokens.weight"].shape[0] == vocab
    # another layout is refused before anything loads, naming the key, even with --force-resume
    for extra, message in (([], r"world_size 2 -> 1"), (["--parallel=ddp", "--force-resume"], r"parallel 'fsdp' -> 'ddp'")):
        with pytest.raises(common.ConfigError, match=r"sharded \(parallel=fsdp\) training state resumes only .*" + message):
            sft.main(run_args(world, killed, grad_accum=1, parallel="fsdp", **args) + ["--resume"] + extra)
    torchrun("sft.py", *run_args(world, killed, grad_accum=1, parallel="fsdp", **args), "--resume")
    c = weights(killed)
    for k in b:
        assert torch.equal(b[k], c[k]), k
    loss = {r["step"]: r["loss"] for r in mb}
    assert all(r["loss"] == loss[r["step"]] for r in read_metrics(killed))


# -----------------------------------------------------------------------------
# rl.py: the GRPO update under FSDP, on the toy policy of test_rl.py

RL_SCRIPT = r'''
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import common, rl, test_fsdp as F, test_rl as T
from safetensors.torch import save_file
from distributed import setup_distributed, cleanup_distributed, shard_model, full_state_dict

rank, world, _, device = setup_distributed()
rl.sample_groups = F.rank_free_sample_groups
for name, kw in json.loads(sys.argv[3]).items():
    model = shard_model(T.toy_model(), device)
    ref = shard_model(T.toy_model(), device).requires_grad_(False) if kw.get("beta") else None
    resume = kw.pop("resume_from_kill", False)
    cfg = T.toy_config(f"{sys.argv[2]}/{name}", **kw)
    if resume:  # killed during step 3, after the step-2 checkpoint; then a fresh model resumes
        T.train(T.toy_config(f"{sys.argv[2]}/{name}", **kw, stop_after_steps=2), model, F.batch_of(rank, world),
                 [], rank, world, ref)
        model = shard_model(T.toy_model(seed=123), device)
        cfg = T.toy_config(f"{sys.argv[2]}/{name}", **kw, resume=True)
    T.train(cfg, model, F.batch_of(rank, world), [], rank, world, ref)
    state = full_state_dict(model, rank)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
                         f"{sys.argv[2]}/{name}/weights.safetensors")
cleanup_distributed()
'''


def rank_free_sample_groups(model, prompts, cfg, generator, stop_ids):
    """rl.sample_groups with each prompt's rollouts drawn from a generator seeded by (step, prompt), so
    one process and two draw the same rollouts (rl.py's own stream depends on the rank, by design)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    seed = int(generator.initial_seed()) - 101 * rank  # rl.step_seed without its rank term
    sampling = rl.SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, tuple(stop_ids))
    model.eval()
    with distributed.full_parameters(model):  # as rl.sample_groups: the sampler runs on the gathered weights
        return [rollout.generate(model, [p], sampling, n=cfg.num_generations,
                                 generator=torch.Generator().manual_seed(seed + 7 * sum(p) + len(p)))[0]
                for p in prompts]


PROMPTS = [[1, 2], [4, 5, 6], [7], [8, 9, 10, 11]]  # the global batch; rank r takes PROMPTS[r::world]


def batch_of(rank, world):
    """The toy batch of test_rl.py, split over ranks; prompt [7]'s rewards are all equal, so its rollouts
    are not trained: rank 0 trains 1 group and forwards 1 frozen one, rank 1 trains 2 (uneven work,
    which the sharded update pads with dummy micro-batches)."""
    def next_batch(step):
        mine = PROMPTS[rank::world]

        def score(groups):
            rewards = torch.tensor([[0.5] * len(g) if p == [7] else [sum(t == 3 for t in s.tokens) / len(s.tokens)
                                                                      for s in g] for p, g in zip(mine, groups)])
            return test_rl.Scored(rewards, [True] * len(groups), [[[1] * len(s.tokens) for s in g] for g in groups])
        return mine, score
    return next_batch


RL_RUNS = {"plain": dict(max_steps=3, lr=1e-3, micro_batch_size=8, save_every=2),
           "kl": dict(max_steps=2, lr=1e-3, micro_batch_size=8, beta=0.05, num_iterations=2),
           "resumed": dict(max_steps=3, lr=1e-3, micro_batch_size=8, save_every=2, resume_from_kill=True)}


def test_rl_fsdp_two_processes_match_one_and_resume_bit_exactly(tmp_path):
    """The same rollouts either way (rank_free_sample_groups; the sampler runs on the gathered weights);
    advantages are per group, the loss normaliser counts both ranks' tokens, FSDP sums the gradients:
    one process and two give the same losses, gradient norms and weights. With beta > 0 the KL reference
    is sharded too. A run killed after its step-2 checkpoint resumes to the same weights, bit for bit."""
    script = tmp_path / "fsdp_rl.py"
    script.write_text(RL_SCRIPT)
    torchrun(str(script), ROOT, str(tmp_path / "two"), json.dumps(RL_RUNS))
    for name in ("plain", "kl"):
        kw = dict(RL_RUNS[name])
        model = toy_model()
        ref = toy_model().requires_grad_(False) if kw.get("beta") else None
        original, rl.sample_groups = rl.sample_groups, rank_free_sample_groups
        try:
            test_rl.train(toy_config(tmp_path / "one" / name, **kw), model, batch_of(0, 1), [], ref_model=ref)
        finally:
            rl.sample_groups = original
        ma, mb = rl_metrics(tmp_path / "one" / name), rl_metrics(tmp_path / "two" / name)
        assert [r["reward_mean"] for r in ma] == pytest.approx([r["reward_mean"] for r in mb], rel=1e-6)  # same rollouts
        assert [r["loss_seqs"] for r in mb] == [32.0] * kw["max_steps"]
        assert all(r["trained_seqs"] == (32.0 if kw.get("beta") else 24.0) for r in mb)
        for key in ("loss", "grad_norm", "entropy", "kl"):
            if key in ma[0]:
                assert [r[key] for r in ma] == pytest.approx([r[key] for r in mb], rel=1e-4, abs=1e-7), key
        assert min(r["grad_norm"] for r in ma) > 0.01 and max(r["lp_diff_max"] for r in mb) < 1e-4
        b = load_file(tmp_path / "two" / name / "weights.safetensors")
        for k, v in model.state_dict().items():
            if k != "lm_head.weight":
                assert torch.allclose(v, b[k], atol=1e-5, rtol=0), (name, k, (v - b[k]).abs().max())
        assert max((v - toy_model().state_dict()[k]).abs().max().item() for k, v in model.state_dict().items()) > 1e-3
    a, c = (load_file(tmp_path / "two" / n / "weights.safetensors") for n in ("plain", "resumed"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert [r["step"] for r in rl_metrics(tmp_path / "two" / "resumed")] == [1, 2, 3]
