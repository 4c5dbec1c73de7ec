"""rollout.py: the sampler against transformers and against itself, the sampling math by hand (the CLIs
built on it: tests/test_label.py).

Tiny random checkpoints come from tests/tiny_checkpoints.py (vocab 256, hidden 64, 2 layers).
"""
import dataclasses
import math
import os
import pytest
import re
import tokenizer_families
from tiny_checkpoints import hf_greedy, hf_model, make_checkpoint

import torch

import common
import label
import rollout
from common import TOKEN_BREAKS, added_token_texts
from confprofile import load_taxonomy, render_prompt
from model import PrefixSharedCache, load_model

EOS = 2  # tiny_checkpoints' eos id; hf_greedy stops there
PROMPTS = [[5, 17, 99], [7, 3, 11, 200, 64, 31, 9, 150, 42, 77, 18], [250], [33, 34, 35, 36, 37, 38]]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = make_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"), seed=1)
    return path, load_model(path)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    path = make_checkpoint("llama3", tmp_path_factory.mktemp("llama3"), seed=2)
    return path, load_model(path)


def teacher_forced_logprobs(model, prompt, sample, temperature):
    """Logprobs of a completion from ONE full forward over prompt + completion (no cache)."""
    ids = torch.tensor([prompt + sample.tokens])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1]
    return rollout.token_logprobs(logits, torch.tensor(sample.tokens), temperature)


# -----------------------------------------------------------------------------
# Sampling math, hand-computed


def test_token_logprobs_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # probs 1/4, 3/4
    tokens = torch.tensor([1])
    assert rollout.token_logprobs(logits, tokens, 1.0).item() == pytest.approx(math.log(0.75), abs=1e-6)
    # T = 0.5 squares the odds: 1/10, 9/10
    assert rollout.token_logprobs(logits, tokens, 0.5).item() == pytest.approx(math.log(0.9), abs=1e-6)
    # T = 0 (greedy) reports the untempered distribution
    assert rollout.token_logprobs(logits, tokens, 0.0).item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_top_k_and_top_p_filters_by_hand():
    inf = float("-inf")
    assert rollout.top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2).tolist() == [[inf, 3.0, 2.0, inf]]
    assert rollout.top_k_filter(torch.tensor([[1.0, 3.0]]), 0).tolist() == [[1.0, 3.0]]
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))
    # p = 0.8: 0.5 + 0.3 reaches 0.8 -> keep those two; p = 0.81 needs the 0.15 too
    assert torch.isfinite(rollout.top_p_filter(logits, 0.8)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(rollout.top_p_filter(logits, 0.81)).tolist() == [[True, True, False, True]]
    assert torch.isfinite(rollout.top_p_filter(logits, 0.1)).tolist() == [[False, True, False, False]]


def test_sample_tokens_draws_from_the_filtered_tempered_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = torch.log(probs).expand(40000, 4)
    g = torch.Generator().manual_seed(0)
    tokens, logprobs = rollout.sample_tokens(logits, temperature=1.0, generator=g)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq, probs, atol=0.01)
    assert torch.allclose(logprobs, torch.log(probs)[tokens], atol=1e-6)
    # top-k = 2 at T = 0.5: weights 0.3^2, 0.4^2 -> 9/25, 16/25 over tokens 2, 3
    tokens, logprobs = rollout.sample_tokens(logits, temperature=0.5, top_k=2, generator=g)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq, torch.tensor([0.0, 0.0, 9 / 25, 16 / 25]), atol=0.01)
    # the logprob is of the tempered distribution before truncation: p^2 / sum p^2 (sum = 0.3)
    assert torch.allclose(logprobs, torch.log(probs[tokens] ** 2 / 0.3), atol=1e-5)
    # top-p = 0.6 alone: 0.4 + 0.3 reach it -> 4/7, 3/7 over tokens 3, 2; logprobs untruncated
    tokens, logprobs = rollout.sample_tokens(logits, temperature=1.0, top_p=0.6, generator=g)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq, torch.tensor([0.0, 0.0, 3 / 7, 4 / 7]), atol=0.01)
    assert torch.allclose(logprobs, torch.log(probs)[tokens], atol=1e-6)
    # a 1000-token vocabulary with a peaked head (top-2 mass 0.9063, top-3 0.9960, top-256 0.9970): the
    # nucleus is found among the probed top tokens (p=0.9), or needs the full sort (p=0.95 probing 2,
    # p=0.999). p=0.907 needs the 3rd token: the probe's mass is measured against the whole vocabulary
    # (within the top 256 alone the top 2 would hold 0.9063 / 0.9970 = 0.909 >= 0.907).
    peaked = torch.cat([torch.tensor([12.0, 11.0, 10.0]), torch.zeros(997)])
    for p, probe in [(0.9, 256), (0.907, 256), (0.9, 2), (0.95, 2), (0.999, 256)]:
        values, index, log_z = rollout.nucleus_candidates(peaked[None], p, probe)
        kept = index[0][~rollout.nucleus_mask(values, p, log_z)[0]].tolist()
        expected = torch.isfinite(rollout.top_p_filter(peaked[None], p)[0]).nonzero().squeeze(1).tolist()
        assert sorted(kept) == expected
        assert p == 0.999 or expected == ([0, 1] if p == 0.9 else [0, 1, 2])
    assert len(expected) > 256  # p = 0.999 needed the full sort
    greedy, _ = rollout.sample_tokens(logits[:3], temperature=0.0)
    assert greedy.tolist() == [3, 3, 3]


def test_two_level_draw_matches_the_distribution_and_never_draws_masked_tokens():
    # 1000 tokens: blocks of 32 with a zero-padded tail; whole blocks and the last tokens masked out
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, generator=g)
    logits[64:96] = float("-inf")  # block 2 has no mass
    logits[990:] = float("-inf")   # nor the end of the last real block
    probs = torch.softmax(logits, dim=-1)
    tokens, log_z = rollout.sample_categorical(logits.expand(200000, 1000), g)
    freq = torch.bincount(tokens, minlength=1000).float() / len(tokens)
    assert freq[probs == 0].sum().item() == 0
    assert (freq - probs).abs().max().item() < 0.002
    assert torch.allclose(log_z, torch.logsumexp(logits, dim=-1).expand(200000), atol=1e-6)
    sampled, logprobs = rollout.sample_tokens(logits.expand(1000, 1000), 0.7, generator=g)
    assert torch.allclose(logprobs, rollout.token_logprobs(logits.expand(1000, 1000), sampled, 0.7), atol=1e-6)


def test_branch_free_sampler_draws_what_the_eager_sampler_draws():
    """sample_tokens(graph=True), the compiled step's form, reads nothing on the host and draws the same
    tokens as the eager form from the same uniforms. Top-p alone: the probe of the 256 most likely tokens
    holds every row's nucleus (the eager form uses it) or not (the eager form sorts everything)."""
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(6, 1000, generator=g) + torch.cat([torch.full((6, 3), 12.0), torch.zeros(6, 997)], dim=1)
    flat_row = torch.cat([peaked[:5], torch.randn(1, 1000, generator=g) * 0.1])  # its nucleus is ~900 tokens
    assert bool(rollout.nucleus_probe(peaked, 0.9)[3]) and not bool(rollout.nucleus_probe(flat_row, 0.9)[3])
    for logits in (peaked, flat_row):
        for temperature, top_k, top_p in [(0.8, 0, 0.9), (0.8, 0, 0.999), (1.0, 0, 1.0), (0.7, 20, 0.9), (0.0, 0, 1.0)]:
            u = torch.rand(6, 1, generator=g)
            eager = rollout.sample_tokens(logits, temperature, top_k, top_p, u=u)
            graph = rollout.sample_tokens(logits, temperature, top_k, top_p, u=u, graph=True)
            assert torch.equal(eager[0], graph[0]) and torch.equal(eager[1], graph[1])
            # and the uniforms are the generator's: u drawn outside = the same draw inside
            inside = rollout.sample_tokens(logits, temperature, top_k, top_p, generator=torch.Generator().manual_seed(1))
            outside = rollout.sample_tokens(logits, temperature, top_k, top_p,
                                            u=rollout.uniforms(6, torch.Generator().manual_seed(1), "cpu"))
            assert torch.equal(inside[0], outside[0])


def test_plan_batches_by_hand():
    # row costs (length + 5 new): prompt1 8, prompt0 10, prompt2 15; budget 40 KV slots
    assert rollout.plan_batches([5, 3, 10], n=2, max_new_tokens=5, max_batch_tokens=40) == \
        [[(1, 0, 2), (0, 0, 2)], [(2, 0, 2)]]
    # 4 rows of 15 do not fit 40: groups of 2 rows, each its own batch
    assert rollout.plan_batches([10], n=4, max_new_tokens=5, max_batch_tokens=40) == [[(0, 0, 2)], [(0, 2, 2)]]


# -----------------------------------------------------------------------------
# The engine against transformers and against itself


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_greedy_ragged_batch_equals_one_at_a_time_and_transformers(family, request):
    path, model = request.getfixturevalue(family)
    hf = hf_model(path)
    batched = rollout.generate(model, PROMPTS, rollout.SamplingParams(max_new_tokens=12, temperature=0, stop_ids=[EOS]))
    # a tiny token budget: one prompt per batch, the longest one split across batches
    split = rollout.generate(model, PROMPTS, rollout.SamplingParams(max_new_tokens=12, temperature=0, stop_ids=[EOS], max_batch_tokens=40), n=3)
    for prompt, [sample], group in zip(PROMPTS, batched, split):
        alone = rollout.generate(model, [prompt], rollout.SamplingParams(max_new_tokens=12, temperature=0, stop_ids=[EOS]))[0][0]
        reference = hf_greedy(hf, prompt, 12)
        assert sample.tokens == alone.tokens == reference
        assert all(s.tokens == reference for s in group)
        assert sample.finish_reason == ("stop" if reference[-1] == EOS else "length")


@pytest.mark.parametrize("chunk_tokens", [8192, 9])  # one forward; or chunks of 2 positions x 4 prompts
def test_prefill_gives_each_prompts_last_token_logits(qwen3, chunk_tokens):
    _, model = qwen3
    cache = model.setup_cache(len(PROMPTS), max(map(len, PROMPTS)))
    logits = rollout.prefill(model, PROMPTS, cache, chunk_tokens=chunk_tokens)
    assert logits.shape == (len(PROMPTS), model.args.vocab_size)
    for prompt, row in zip(PROMPTS, logits):
        with torch.no_grad():
            expected = model(torch.tensor([prompt]))[0, -1]  # a full forward, no cache, no padding
        assert torch.allclose(row, expected, atol=1e-4)


@pytest.mark.parametrize("static", [False, True])  # True: the compiled decode's fixed-shape attention
def test_prefix_shared_cache_gives_the_same_logits_as_copied_rows(qwen3, static):
    """PrefixSharedCache (one copy of each prompt + per-row suffixes) against a KVCache where every row
    was prefilled on its own: ragged prompts, 3 and 2 rows, rows out of lockstep, rows dropped."""
    _, model = qwen3
    prompts, counts = PROMPTS[:2], [3, 2]
    row_prompt = [0, 0, 0, 1, 1]
    prompt_cache = model.setup_cache(2, max(map(len, prompts)))
    first = rollout.prefill(model, prompts, prompt_cache)
    shared = PrefixSharedCache(prompt_cache, [len(p) for p in prompts], counts, 4, static=static)
    copied = model.setup_cache(5, max(map(len, prompts)) + 4)
    first_copied = rollout.prefill(model, [prompts[i] for i in row_prompt], copied)
    assert torch.allclose(first[row_prompt], first_copied, atol=1e-5)
    lengths = torch.tensor([len(prompts[i]) for i in row_prompt])
    g = torch.Generator().manual_seed(0)
    # suffix slot per row and step; step 3: row 2 rewrites slot 0 and must not see its stale slot 1
    steps = [[0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [2, 2, 0, 2, 2], [3, 3, 1, 3, 3]]
    rows = torch.arange(5)
    for step, slots in enumerate(steps):
        if step == 3:  # drop rows 1 and 3 (a compaction), from both caches
            rows = torch.tensor([0, 2, 4])
            shared = shared.select_rows(rows)
            small = model.setup_cache(3, copied.max_len)
            small.k.copy_(copied.k[:, rows])
            small.v.copy_(copied.v[:, rows])
            copied = small
        token = torch.randint(3, 256, (len(rows),), generator=g)
        positions = (lengths + torch.tensor(slots))[rows][:, None]
        with torch.no_grad():
            a = model(token[:, None], positions, shared)[:, -1]
            b = model(token[:, None], positions, copied)[:, -1]
        assert torch.allclose(a, b, atol=1e-5)
    if not static:
        with pytest.raises(ValueError, match="outside 0..3"):
            model(token[:, None], positions + 1, shared)


def decode_inputs(model, prompts, counts, max_new_tokens, stop_ids):
    """What a compiled decode step gets: a static prefix-shared cache on the prefilled prompts, the
    decode state after the first token, the rows' uniforms."""
    prompt_cache = model.setup_cache(len(prompts), rollout.PREFIX_BUCKET)
    last = rollout.prefill(model, prompts, prompt_cache)
    cache = PrefixSharedCache(prompt_cache, [len(p) for p in prompts], counts, max_new_tokens, static=True)
    row_prompt = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(counts))
    state = rollout.DecodeState.allocate(sum(counts), max_new_tokens, model.args.vocab_size, "cpu")
    state.start(torch.tensor([len(p) for p in prompts])[row_prompt], stop_ids)
    rollout.record_tokens(state, *rollout.sample_tokens(last[row_prompt], temperature=0.0))
    return state, cache, torch.rand(sum(counts), 1, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vocab_1000(tmp_path_factory):
    """A vocabulary larger than rollout.NUCLEUS_PROBE, so that top-p alone takes the probe's path."""
    return load_model(make_checkpoint("qwen3", tmp_path_factory.mktemp("v1000"), seed=3, vocab_size=1000))


@torch.inference_mode()
def test_decode_step_is_one_graph_without_host_reads(vocab_1000):
    """The compiled decode step (model forward, temperature, top-k, top-p, logprobs, stop ids, the
    bookkeeping) is one graph: dynamo's explain finds no graph break. With capture_scalar_outputs off,
    any .item(), bool(tensor) or int(tensor) inside it (a host sync on a GPU) would be a break, as the
    eager form's top-p shows."""
    model = vocab_1000
    state, cache, u = decode_inputs(model, PROMPTS, [3, 2, 1, 2], 10, stop_ids=[7, 100])
    with torch._dynamo.config.patch(capture_scalar_outputs=False):
        for settings in [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9),
                         dict(temperature=0.8, top_p=0.9), dict(temperature=0.0)]:
            step = rollout.graph_decode_step(rollout.SamplingParams(**settings))
            explained = torch._dynamo.explain(step)(model, state, cache, u)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), (settings, explained.break_reasons)
        eager_form = torch._dynamo.explain(rollout.decode_step)(model, state, cache, u, 0.8, 0, 0.9, graph=False)
        assert eager_form.graph_break_count > 0
        assert "item()" in str(eager_form.break_reasons[0].reason)


def test_compiled_decode_gives_the_same_samples_and_reuses_its_buffers(qwen3, monkeypatch):
    """A torch.compile'd model: generate() decodes with the compiled decode step (one graph: forward and
    sampler) on fixed shapes, every row to the end, and gives the eager model's samples for the same
    seed: top-k, top-p, temperature, rows stopping; eager decoding drops finished rows (at the host's
    reads, every 3 steps here) and the compiled one draws the same uniforms for the rows it would still
    run. A second call of the same shape (other prompts, within the same PREFIX_BUCKET) reuses the
    buffers and the compiled step: nothing is compiled again, no tensor the step reads moves."""
    _, model = qwen3
    compiled = torch.compile(model)
    compiles = []
    torch._dynamo.callback.on_compile_start(compiles.append)
    sampling = rollout.SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9,
                                      stop_ids=tuple(range(3, 256, 7)), sync_every=3)
    other = [[9, 8, 7, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [44], [60, 61, 62]]
    dropped = []  # rows kept each time finished rows are dropped
    select_rows = PrefixSharedCache.select_rows
    monkeypatch.setattr(PrefixSharedCache, "select_rows", lambda cache, keep: dropped.append(len(keep)) or
                        select_rows(cache, keep))
    try:
        addresses = []
        for prompts, seed in [(PROMPTS, 5), (other, 6)]:
            eager = rollout.generate(model, prompts, sampling, n=3, seed=seed)
            assert dropped and max(dropped) < 12  # eager decoding dropped finished rows
            dropped.clear()
            comp = rollout.generate(compiled, prompts, sampling, n=3, seed=seed)
            assert not dropped  # the compiled one decoded all 12 to the end
            assert [[s.tokens for s in g] for g in comp] == [[s.tokens for s in g] for g in eager]
            for g, h in zip(comp, eager):
                for a, b in zip(g, h):
                    assert a.finish_reason == b.finish_reason
                    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
            fixed = rollout._STATIC_DECODES[compiled]
            addresses.append((id(fixed), fixed.cache.k.data_ptr(), fixed.prompt_cache.k.data_ptr(),
                              fixed.state.out_tokens.data_ptr(), fixed.u.data_ptr()))
            if seed == 5:
                n_compiles = len(compiles)
        assert addresses[0] == addresses[1] and len(compiles) == n_compiles >= 1
    finally:
        torch._dynamo.callback.callback_handler.remove_start_callback(compiles.append)


def load_bench():
    """bench/rollout.py as a module (bench/ is a folder of scripts, not a package)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "rollout.py")
    spec = importlib.util.spec_from_file_location("bench_rollout", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_prints_the_memory_bandwidth_of_a_decode_step(qwen3, llama3, capsys):
    """bench/rollout.py, gpt-fast style: bytes a decode step reads (by hand for the tiny checkpoints),
    GB/s = those bytes / (wall time / new tokens), % of peak = GB/s / --peak-gbps, printed beside tok/s."""
    bench = load_bench()
    # qwen3, untied: per layer q 64x96, k and v 64x48, o 96x64, q/k norms 24 each, MLP 3 x 64x128, two
    # norms of 64 = 43,184; x 2 layers + final norm 64 + lm_head 256x64 (the embedding table: only the
    # rows a step looks up) = 102,816 fp32 weights = 411,264 bytes. KV per token: 2 x 2 layers x 2 heads
    # x 24 x 4 bytes = 768; prompts of 3 and 11 tokens once, 2 x 4 rows x 10 new / 2 on average = 54 tokens.
    assert bench.decode_step_bytes(qwen3[1], [3, 11], 4, 10) == 411_264 + 54 * 768
    # llama3, tied: per layer 36,992 (head_dim 16), x 2 + 64 + the table once (16,384) = 90,432 weights;
    # KV 2 x 2 x 2 x 16 x 4 = 512 bytes per token
    assert bench.decode_step_bytes(llama3[1], [5], 1, 8) == 90_432 * 4 + (5 + 4) * 512
    assert bench.bandwidth(452_736, 0.5, 10, 0.1) == pytest.approx((0.00905472, 0.0905472))
    assert bench.bandwidth(452_736, 0.5, 10, None)[1] is None
    args = bench.main_parser().parse_args(["--shapes", "2x4", "--new-tokens", "6", "--prompt-len", "12",
                                           "--peak-gbps", "0.5"])
    args.shapes = [args.shapes]
    with torch.inference_mode():
        bench.run_case("tiny", qwen3[0], args, torch.device("cpu"), torch.float32, (0.5, "--peak-gbps"))
    out = capsys.readouterr().out
    step_gb = float(re.search(r"; ([\d.e+-]+) GB/step\)", out).group(1))
    number = r"([\d.e+-]+)"
    rows = re.findall(rf"(ours|transformers): +{number} tok/s, +{number} ms/step, +{number} GB/s \({number}% of peak\)", out)
    assert [r[0] for r in rows] == ["ours", "transformers"], out
    for _, tok_s, ms, gbs, share in rows:  # (as printed: to 3 decimals of a ms, 4 digits of GB/s)
        assert float(tok_s) * float(ms) / 1e3 == pytest.approx(8, rel=0.01)  # 2 x 4 rows, one token each per step
        assert float(gbs) == pytest.approx(step_gb / (float(ms) / 1e3), rel=0.01)
        assert float(share) == pytest.approx(100 * float(gbs) / 0.5, rel=0.01)


def test_onednn_linears_give_f_linear_logits_repack_every_call_and_restore(qwen3):
    """generate()'s CPU fast path: nn.Linear through oneDNN on weights packed on entry."""
    path, _ = qwen3
    model = load_model(path)  # its own copy: a weight is changed below
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        plain = model(ids)
        with rollout.onednn_linears(model):
            assert all("forward" in m.__dict__ for m in linears) == torch.backends.mkldnn.is_available()
            packed = model(ids)
        assert not any("forward" in m.__dict__ for m in linears)  # nn.Linear.forward again
        assert torch.allclose(packed, plain, atol=1e-5)
        model.lm_head.weight.zero_()  # RL changes the weights between calls: each call packs them anew
    assert rollout.generate(model, [PROMPTS[1]], rollout.SamplingParams(max_new_tokens=4, temperature=0))[0][0].tokens == [0, 0, 0, 0]
    bf16 = load_model(path, dtype=torch.bfloat16)
    with rollout.onednn_linears(bf16):  # bf16 (and GPU, compiled) models are left as they are
        assert not any("forward" in m.__dict__ for m in bf16.modules())


@pytest.mark.parametrize("temperature,top_k,top_p,stop_ids,sync_every", [
    (1.0, 0, 1.0, (), 0), (0.7, 20, 0.9, range(3, 256, 7), 0), (0.7, 20, 0.9, range(3, 256, 7), 4)])
def test_sampler_logprobs_equal_teacher_forced(qwen3, temperature, top_k, top_p, stop_ids, sync_every):
    """Also with many stop ids: rows finish at different steps and the decode cache is compacted
    (rollout.COMPACT_AT) several times, at every step or every 4th (sync_every); every later logprob
    still matches a full forward."""
    _, model = qwen3
    out = rollout.generate(model, PROMPTS, rollout.SamplingParams(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids, sync_every=sync_every), n=3, seed=0)
    lengths = sorted(len(s.tokens) for group in out for s in group)
    if stop_ids:
        assert lengths[0] < 5 and lengths[-1] >= 6  # some rows stopped early, others decoded on after compaction
    for prompt, group in zip(PROMPTS, out):
        assert len({tuple(s.tokens) for s in group}) > 1  # each row drew its own tokens, first one included
        for sample in group:
            assert len(sample.logprobs) == len(sample.tokens)
            expected = teacher_forced_logprobs(model, prompt, sample, temperature)
            assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)


def test_stop_ids_and_max_new_tokens_are_honoured(qwen3):
    _, model = qwen3
    free = rollout.generate(model, [PROMPTS[1]], rollout.SamplingParams(max_new_tokens=12, temperature=0))[0][0].tokens
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # first occurrence at index k >= 2
    stopped = rollout.generate(model, [PROMPTS[1]], rollout.SamplingParams(max_new_tokens=12, temperature=0, stop_ids=[free[k], 255]))[0][0]
    assert stopped.tokens == free[:k + 1] and stopped.finish_reason == "stop"
    short = rollout.generate(model, [PROMPTS[1]], rollout.SamplingParams(max_new_tokens=2, temperature=0))[0][0]
    assert short.tokens == free[:2] and short.finish_reason == "length"
    # sampled rows: a "stop" sample ends at its first stop id, a "length" one has none and is full length,
    # also when the host looks for finished rows only every 5 steps (rows run on past their stop)
    stops = {free[k], 7, 100}
    for sync_every in (1, 5):
        sampling = rollout.SamplingParams(max_new_tokens=8, stop_ids=stops, sync_every=sync_every)
        for group in rollout.generate(model, PROMPTS, sampling, n=4, seed=3):
            for s in group:
                if s.finish_reason == "stop":
                    assert s.tokens[-1] in stops and not stops & set(s.tokens[:-1])
                else:
                    assert len(s.tokens) == 8 and not stops & set(s.tokens)
    # without stop ids no row is dropped, so how often the host looks changes nothing
    sampling = rollout.SamplingParams(max_new_tokens=8, top_k=50)
    assert rollout.generate(model, PROMPTS, sampling, n=3, seed=4) == \
        rollout.generate(model, PROMPTS, dataclasses.replace(sampling, sync_every=3), n=3, seed=4)
    with pytest.raises(ValueError, match="generate: sync_every: expected an integer >= 0"):
        rollout.generate(model, PROMPTS, dataclasses.replace(sampling, sync_every=-1))


@pytest.mark.parametrize("setting, message", [
    (dict(temperature=float("nan")), "temperature: expected a finite number >= 0"),
    (dict(temperature=-0.5), "temperature: expected a finite number >= 0"),
    (dict(top_p=0.0), r"top_p: expected a number in \(0, 1\]"), (dict(top_p=-1.0), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k: expected an integer >= 0")])
def test_sampler_settings_are_checked_before_any_work(qwen3, setting, message, capsys):
    """#13 item 5: a NaN or negative temperature, top_p <= 0 (or > 1, NaN), top_k < 0 are a ValueError
    naming the setting (they crashed inside the sampler, or sampled nonsense), and usage errors on the CLI."""
    _, model = qwen3
    with pytest.raises(ValueError, match="generate: " + message):
        rollout.generate(model, PROMPTS, rollout.SamplingParams(max_new_tokens=3, **setting), n=2, seed=0)
    (key, value), = setting.items()
    with pytest.raises(SystemExit) as e:  # the command line: one line naming the key, exit status 1
        common.run_cli(label.main, "label.py", ["--teacher", "sim", "--users", "u.jsonl", "--out", "o.jsonl",
                                                f"--{key.replace('_', '-')}", str(value)])
    assert e.value.code.startswith("label.py: error: label: " + key) and "expected" in e.value.code


def test_same_seed_same_samples_different_seed_different(qwen3):
    _, model = qwen3
    sampling = rollout.SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = rollout.generate(model, PROMPTS, sampling, n=4, seed=11)
    b = rollout.generate(model, PROMPTS, sampling, n=4, generator=torch.Generator().manual_seed(11))
    c = rollout.generate(model, PROMPTS, sampling, n=4, seed=12)
    assert a == b
    assert [[s.tokens for s in g] for g in a] != [[s.tokens for s in g] for g in c]


# -----------------------------------------------------------------------------
# CLIs with a tiny tokenizer (byte-level BPE + ChatML template)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_chat_checkpoint(out_dir):
    """A tiny Qwen3 checkpoint with a BPE tokenizer (vocab 300) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the user watched cooking videos", "gender age education"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)
    make_checkpoint("qwen3", out_dir, seed=4, vocab_size=len(fast), eos_token_id=fast.eos_token_id,
                    max_position_embeddings=4096)
    fast.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("chat"))


def test_tokenizer_helpers(chat_checkpoint):
    tok = common.load_tokenizer(chat_checkpoint)
    ids = common.chat_prompt_ids(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert common.stop_ids_for(tok) == sorted(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))


# -----------------------------------------------------------------------------
# Untrusted users and files


def control_token_counts(tok, messages):
    """(added/special tokens in the prompt ids we build, in the ids of the raw template, the raw rendering)."""
    added = set(tok.added_tokens_decoder) | set(tok.all_special_ids)
    ours = common.chat_prompt_ids(tok, messages)
    raw_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raw = tok(raw_text, add_special_tokens=False)["input_ids"]
    return sum(i in added for i in ours), sum(i in added for i in raw), ours, raw_text


@pytest.mark.parametrize("family", tokenizer_families.FAMILIES)
def test_user_text_never_becomes_control_tokens(family):
    """#13 item 1: whatever the tokenizer, a user stuffed with every added token of it (special or not:
    <|im_end|>, <|eot_id|>, <think>, <tool_call>, <repo_name>, ...) gives exactly as many control tokens in
    its prompt ids as a clean user, and reads the same (the break is invisible)."""
    tok = tokenizer_families.load(family)
    texts = added_token_texts(tok)
    expected = {"demo": "<|im_end|>", "chatml_bpe": "<|im_end|>", "llama3": "<|eot_id|>", "qwen3": "<think>",
                "smollm2": "<repo_name>"}[family]
    assert expected in texts and len(texts) >= 3
    tax = load_taxonomy()
    clean_messages = render_prompt(tokenizer_families.stuffed_user(texts, attack=False), tax)
    stuffed_messages = render_prompt(tokenizer_families.stuffed_user(texts), tax)
    clean, clean_raw, _, _ = control_token_counts(tok, clean_messages)
    stuffed, stuffed_raw, ids, raw_text = control_token_counts(tok, stuffed_messages)
    assert all(t.replace("</", "<\\/") in raw_text for t in texts)  # every added-token text is in the prompt
    assert clean == clean_raw and stuffed_raw > clean  # the attack is real without the defence
    assert stuffed == clean
    assert tok.decode(ids).replace(TOKEN_BREAKS[0], "") == raw_text  # what the model reads is the same text
