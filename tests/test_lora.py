"""LoRA written by hand (model.LoRALinear, add_lora, adapters_off, merged checkpoints) and its use in
sft.py and rl.py: the formula by hand, gradients reach the adapters only, adapters off is the base
model, the merge is W + (alpha / r) B A and transformers reads it to our adapted logits, a killed LoRA
run resumes bit for bit, and RL's KL reference through adapters off equals a separately loaded copy."""
import json
import os
import pytest
import subprocess
import sys
import types

import torch
from safetensors.torch import load_file
from test_sft import TINY, synthetic_chats, write_jsonl
from tiny_checkpoints import FAMILIES, VOCAB, hf_model, make_checkpoint

import common
import trainer
import profilebench
import rl
import sft
import test_rl
from model import (LORA_TARGETS, AdaptersOff, LoRALinear, adapters_off, add_lora, load_model, merge_lora_weight,
                   merged_state_dict, save_adapter, save_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def randomize_adapters(model, seed=0):
    """B starts at zero (the adapted model is the base); give it values so the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ckpt")
    return {f: make_checkpoint(f, root / f) for f in FAMILIES}


def ids(seed=0):
    return torch.randint(3, VOCAB, (2, 19), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# The layer and the merge, by hand


def test_lora_linear_and_its_merge_by_hand():
    """W = [[1, 2], [3, 4]], b = [0.5, -0.5], r = 1, alpha = 2, A = [[1, -1]], B = [[0.5], [2]], x = [1, 2]:
    W x + b = [5.5, 10.5]; A x = -1; (alpha / r) B A x = 2 * [-0.5, -2] = [-1, -4]; y = [4.5, 6.5].
    Merged W' = W + 2 B A = [[2, 1], [7, 0]], and W' x + b = [4.5, 6.5] again."""
    base = torch.nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = LoRALinear(base, rank=1, alpha=2.0)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, -1.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[0.5], [2.0]]))
    x = torch.tensor([[1.0, 2.0]])
    assert layer(x).tolist() == [[4.5, 6.5]]
    layer.enabled = False
    assert layer(x).tolist() == [[5.5, 10.5]]
    merged = merge_lora_weight(base.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    assert merged.tolist() == [[2.0, 1.0], [7.0, 0.0]]
    assert not base.weight.requires_grad and layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad


def test_lora_init_a_uniform_b_zero_and_seeded():
    base = torch.nn.Linear(64, 32)
    a = LoRALinear(base, 8, 16.0, generator=torch.Generator().manual_seed(3))
    b = LoRALinear(base, 8, 16.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.lora_A.weight, b.lora_A.weight) and a.lora_A.weight.shape == (8, 64)
    assert a.lora_A.weight.abs().max() <= 1 / 8 and a.lora_A.weight.std() > 0.05  # U(-1/sqrt(64), 1/sqrt(64))
    assert a.lora_B.weight.shape == (32, 8) and not a.lora_B.weight.any() and a.scaling == 2.0
    assert a.lora_A.weight.dtype == torch.float32


# -----------------------------------------------------------------------------
# On every model family


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_adapters_start_as_the_base_and_off_is_the_base(checkpoints, family):
    model = load_model(checkpoints[family])
    base = model(ids())
    add_lora(model, 4, 8.0, seed=0)
    assert len(lora_layers(model)) == 2 * len(LORA_TARGETS)  # 7 per block, 2 blocks
    assert torch.equal(model(ids()), base)  # B = 0: training starts from the base model exactly
    randomize_adapters(model)
    adapted = model(ids())
    assert (adapted - base).abs().max() > 0.1
    with adapters_off(model):
        assert torch.equal(model(ids()), base)
    assert torch.equal(AdaptersOff(model)(ids()), base)
    assert torch.equal(model(ids()), adapted)  # switched back on after the block


@pytest.mark.parametrize("family", ["qwen3", "llama_untied"])
def test_gradients_reach_only_the_adapters(checkpoints, family):
    model = randomize_adapters(add_lora(load_model(checkpoints[family]), 4, 8.0, seed=0)).train()
    model.gradient_checkpointing = family == "qwen3"
    model(ids()).float().pow(2).mean().backward()
    adapters = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(adapters) == 2 * 2 * len(LORA_TARGETS)
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.requires_grad and p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    optimizer = trainer.build_optimizer(model, types.SimpleNamespace(lr=1e-3, weight_decay=0.1, adam_beta1=0.9,
                                                                    adam_beta2=0.95))
    named = {id(p): n for n, p in model.named_parameters()}
    assert {named[id(p)] for g in optimizer.param_groups for p in g["params"]} == adapters
    assert isinstance(optimizer, torch.optim.AdamW)  # fp32 adapters: plain AdamW


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weights_are_w_plus_scaled_b_a(checkpoints, dtype):
    model = randomize_adapters(add_lora(load_model(checkpoints["qwen2"], dtype=dtype), 4, 8.0, seed=0))
    base = load_model(checkpoints["qwen2"], dtype=dtype).state_dict()
    merged = merged_state_dict(model)
    assert set(merged) == set(base)  # HF names, no adapter tensors left
    for name, m in lora_layers(model).items():
        w = merged[f"{name}.weight"]
        expected = base[f"{name}.weight"].float() + 2.0 * m.lora_B.weight @ m.lora_A.weight
        assert w.dtype == dtype
        if dtype == torch.float32:
            assert torch.allclose(w, expected, atol=1e-6, rtol=0), name
        else:  # rounded once to bf16 from the fp32 sum
            assert torch.equal(w, expected.to(torch.bfloat16)), name
        assert (expected - base[f"{name}.weight"].float()).abs().max() > 1e-3
    for name in set(base) - {f"{n}.weight" for n in lora_layers(model)}:
        assert torch.equal(merged[name], base[name]), name  # biases, norms, embeddings untouched


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_merged_checkpoint_loads_in_transformers_with_the_adapted_logits(checkpoints, tmp_path, family):
    model = randomize_adapters(add_lora(load_model(checkpoints[family]), 4, 8.0, seed=1), seed=1)
    adapted = model(ids(1))
    save_model(model, tmp_path / "merged")
    assert (hf_model(str(tmp_path / "merged"))(ids(1)).logits - adapted).abs().max() < 1e-4
    assert (load_model(str(tmp_path / "merged"))(ids(1)) - adapted).abs().max() < 1e-4


def test_save_adapter_writes_peft_files_that_rebuild_the_merge(checkpoints, tmp_path):
    model = randomize_adapters(add_lora(load_model(checkpoints["qwen3"]), 4, 8.0, targets=["q_proj", "down_proj"]))
    save_adapter(model, tmp_path / "adapter", base_model="base")
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "base_model_name_or_path")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "down_proj"],
        "base_model_name_or_path": "base"}
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 2 and all(k.startswith("base_model.model.model.layers.") for k in tensors)
    base, merged = load_model(checkpoints["qwen3"]).state_dict(), merged_state_dict(model)
    name = "model.layers.1.mlp.down_proj"
    A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
    assert A.shape == (4, 128) and B.shape == (64, 4)
    assert torch.equal(merge_lora_weight(base[f"{name}.weight"], A, B, 8.0 / 4), merged[f"{name}.weight"])
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(load_model(checkpoints["qwen3"]), tmp_path / "none")


def test_bad_targets_are_refused():
    with pytest.raises(common.ConfigError, match=r"lora_targets: expected a list of items among \['q_proj'"):
        sft.SFTConfig(lora_targets=["q_proj", "lm_head"])
    with pytest.raises(common.ConfigError, match="lora_targets: expected a non-empty"):
        rl.RLConfig(lora_targets=[])


def test_lora_with_fsdp_is_refused_naming_both_keys(tmp_path):
    for config in (sft.SFTConfig, rl.RLConfig):
        with pytest.raises(common.ConfigError, match="lora_rank=4, parallel=fsdp: expected parallel ddp with LoRA"):
            config(lora_rank=4, parallel="fsdp")
        assert config(lora_rank=4, parallel="ddp").parallel == "ddp"  # LoRA alone and DDP stay allowed
        assert config(lora_rank=0, parallel="fsdp").parallel == "fsdp"
    # on the command line: one line and exit 1, before any process group or model (nothing written)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "--lora-rank", "4", "--parallel", "fsdp",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "sft.py: error: sft config: lora_rank=4, parallel=fsdp: expected parallel ddp with LoRA "
        "(LoRA with FSDP is not supported; docs/fsdp.md)"]
    assert not out.exists()


# -----------------------------------------------------------------------------
# sft.py: a killed LoRA run resumes bit for bit; the state holds the adapters only


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_sft")
    data = write_jsonl(d / "sft.jsonl", synthetic_chats(64))
    student = sft.build_demo_student(sft.corpus_texts([data]), str(d / "student"), seed=0, **TINY)
    return types.SimpleNamespace(dir=d, data=data, student=student)


def lora_args(world, out, **over):
    cfg = dict(model=world.student, data=world.data, output_dir=str(out), eval_fraction=0.1, max_steps=5, lr=1e-2,
               warmup_steps=1, batch_size=8, grad_accum=2, max_len=256, seed=1, eval_every=0, save_every=2,
               lora_rank=4, lora_alpha=8, lora_dropout=0.1, lora_targets='["q_proj","v_proj","up_proj","down_proj"]')
    cfg.update(over)
    return [f"--{k}={v}" for k, v in cfg.items()]


def test_sft_lora_run_trains_adapters_only_and_resumes_bitwise_after_a_kill(world, one_thread):
    straight, killed = world.dir / "straight", world.dir / "killed"
    sft.main(lora_args(world, straight, lora_save_adapter="true"))
    assert sft.main(lora_args(world, killed, stop_after_steps=3)) is None
    state = load_file(killed / "train_state" / "model.safetensors")
    assert len(state) == 2 * 4 * 2 and all(".lora_" in k for k in state)  # the adapters, not the frozen base
    assert json.load(open(killed / "train_state" / "state.json"))["parameters"] == "trainable"
    with pytest.raises(common.ConfigError, match="lora_rank 4 -> 8"):
        sft.main(lora_args(world, killed, lora_rank=8) + ["--resume"])
    r = subprocess.run([sys.executable, "sft.py", *lora_args(world, killed), "--resume"], cwd=ROOT,
                       timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The merged checkpoint: targeted matrices moved, everything else is the base, bit for bit.
    base = load_file(os.path.join(world.student, "model.safetensors"))
    assert set(a) == set(base)
    moved = {k for k in a if not torch.equal(a[k], base[k])}
    assert moved == {f"model.layers.{i}.{p}.weight" for i in range(2)
                     for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")}
    adapter = load_file(straight / "adapter" / "adapter_model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    assert torch.allclose(a[f"{name}.weight"], merge_lora_weight(base[f"{name}.weight"],
                          adapter[f"base_model.model.{name}.lora_A.weight"],
                          adapter[f"base_model.model.{name}.lora_B.weight"], 8 / 4), atol=0, rtol=0)
    losses = [m["loss"] for m in map(json.loads, open(straight / "metrics.jsonl"))]
    assert losses[-1] < losses[0]


# -----------------------------------------------------------------------------
# rl.py: adapters only, the KL reference through adapters off, resume


def lora_toy(seed=0):
    return add_lora(test_rl.toy_model(seed), 4, 8.0, seed=seed)


def test_rl_kl_reference_through_adapters_off_equals_a_loaded_copy(tmp_path):
    """beta > 0: the reference computed by switching the policy's own adapters off gives the same run, bit
    for bit, as a separate frozen copy of the base model; the KL is positive once the adapters moved."""
    runs = {}
    for name in ("adapters_off", "copy"):
        model = lora_toy()
        base = test_rl.toy_model().requires_grad_(False)
        ref = AdaptersOff(model) if name == "adapters_off" else base
        cfg = test_rl.toy_config(tmp_path / name, beta=0.1, max_steps=3, num_iterations=2)
        test_rl.train(cfg, model, test_rl.toy_batch, stop_ids=[], ref_model=ref)
        runs[name] = (model, test_rl.read_metrics(tmp_path / name))
        frozen = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
        assert frozen.keys() == base.state_dict().keys()
        assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())  # the base never moved
    (a, ma), (b, mb) = runs["adapters_off"], runs["copy"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [m["kl"] for m in ma] == [m["kl"] for m in mb] and ma[-1]["kl"] > 0 and ma[0]["optimizer_step"] == 1


def test_rl_lora_resume_equals_uninterrupted(tmp_path):
    a = lora_toy()
    test_rl.train(test_rl.toy_config(tmp_path / "a", max_steps=4, save_every=2, beta=0.05), a, test_rl.toy_batch,
             stop_ids=[], ref_model=AdaptersOff(a))
    b = lora_toy()
    cfg = test_rl.toy_config(tmp_path / "b", max_steps=4, save_every=2, beta=0.05, stop_after_steps=3)
    assert test_rl.train(cfg, b, test_rl.toy_batch, stop_ids=[], ref_model=AdaptersOff(b)) == 3
    b = randomize_adapters(lora_toy(), seed=5)  # a fresh process: the base from `model`, adapters from the state
    assert test_rl.train(test_rl.toy_config(tmp_path / "b", max_steps=4, save_every=2, beta=0.05, resume=True), b,
                    test_rl.toy_batch, stop_ids=[], ref_model=AdaptersOff(b)) == 4
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert [m["reward_mean"] for m in test_rl.read_metrics(tmp_path / "a")] == \
        [m["reward_mean"] for m in test_rl.read_metrics(tmp_path / "b")]


def test_rl_main_with_lora_and_beta_loads_the_weights_once(world, tmp_path, monkeypatch):
    profilebench.main(["--out", str(tmp_path / "world"), "--n-train", "4", "--n-test", "1", "--seed", "3"])
    loads = []
    real = trainer.load_model  # trainer.build_policy and trainer.build_reference load for rl.py
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "rl"
    argv = [f"--model={world.student}", f"--data={tmp_path / 'world' / 'train.jsonl'}", f"--output-dir={out}",
            "--batch-size=2", "--num-generations=2", "--max-new-tokens=6", "--max-steps=2", "--difficulty=off",
            "--lr=1e-2", "--warmup-steps=0", "--beta=0.1", "--lora-rank=2", "--probe-size=0", "--lora-save-adapter"]
    assert rl.main(argv) == str(out)
    assert len(loads) == 1  # the reference is the policy with its adapters off, not a second load
    metrics = test_rl.read_metrics(out)
    assert len(metrics) == 2 and all("kl" in m for m in metrics)
    assert load_file(out / "model.safetensors").keys() == load_file(os.path.join(world.student, "model.safetensors")).keys()
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "train_state").exists()
