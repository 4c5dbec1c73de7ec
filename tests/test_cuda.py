"""The GPU path, where there is a CUDA GPU (skipped elsewhere, so CI on a CPU machine skips it): model.py
against transformers on the GPU in fp32 and bf16, the sampler's logprobs, the torch.compile'd decode
step (CUDA graphs, reused across calls) against the eager one, and a decode step without host syncs.
`bench/gpu_check.sh` runs this file with -s (the measured differences are printed) next to the
benchmarks.
"""
import pytest
from tiny_checkpoints import FAMILIES, VOCAB, make_checkpoint

import torch
from torch._dynamo.utils import counters

import rollout
from model import PrefixSharedCache, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [[5, 17, 99], [7, 3, 11, 200, 64, 31, 9, 150, 42, 77, 18], [250], [33, 34, 35, 36, 37, 38]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: make_checkpoint(f, root / f) for f in FAMILIES}


def hf_on_gpu(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()


def random_ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_fp32_logits_cached_decode_and_greedy_match_transformers(checkpoints, family):
    ours, hf = load_model(checkpoints[family], device="cuda"), hf_on_gpu(checkpoints[family])
    ids = random_ids(3, 20)
    full = hf(ids).logits.float()
    prefill_diff = (ours(ids) - full).abs().max().item()
    cache = ours.setup_cache(3, 20)  # prefill 12 positions, then 8 decode steps of one token
    steps = [ours(ids[:, :12], torch.arange(12, device="cuda").expand(3, 12), cache)[:, -1]]
    for pos in range(12, 19):
        steps.append(ours(ids[:, pos:pos + 1], torch.full((3, 1), pos, device="cuda"), cache)[:, -1])
    decode_diff = (torch.stack(steps, 1) - full[:, 11:19]).abs().max().item()
    print(f"\n{family} fp32 on {torch.cuda.get_device_name()}: max |logit diff| prefill {prefill_diff:.2e}, "
          f"cached decode {decode_diff:.2e}")
    assert prefill_diff < 1e-4 and decode_diff < 1e-4
    for prompt in PROMPTS:
        x = torch.tensor([prompt], device="cuda")
        theirs = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                             pad_token_id=0, eos_token_id=2)[0, len(prompt):].tolist()
        mine = rollout.generate(ours, [prompt], rollout.SamplingParams(max_new_tokens=12, temperature=0, stop_ids=[2]))[0][0].tokens
        assert mine == theirs


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_bf16_logits_are_as_close_to_fp32_as_transformers_bf16(checkpoints, family):
    """bf16 rounds differently in every kernel, so our bf16 logits are checked against the fp32 truth
    with transformers' bf16 error as the yardstick."""
    path = checkpoints[family]
    ids = random_ids(3, 20, seed=1)
    truth = hf_on_gpu(path)(ids).logits.float()
    ours = load_model(path, dtype=torch.bfloat16, device="cuda")(ids)
    theirs = hf_on_gpu(path, torch.bfloat16)(ids).logits.float()
    e_ours, e_hf = (ours - truth).abs().max().item(), (theirs - truth).abs().max().item()
    agree = (ours.argmax(-1) == truth.argmax(-1)).float().mean().item()
    agree_hf = (theirs.argmax(-1) == truth.argmax(-1)).float().mean().item()
    print(f"\n{family} bf16: max |logit - fp32| ours {e_ours:.3f} vs transformers {e_hf:.3f}; "
          f"argmax = fp32's on {100 * agree:.1f}% vs {100 * agree_hf:.1f}% of positions")
    assert e_ours <= max(2 * e_hf, 0.05)
    assert agree >= agree_hf - 0.05


def teacher_forced(model, prompt, tokens, temperature):
    ids = torch.tensor([prompt + tokens], device="cuda")
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1]
    return rollout.token_logprobs(logits, torch.tensor(tokens, device="cuda"), temperature).cpu()


def test_sampler_logprobs_equal_teacher_forced_on_gpu(checkpoints):
    model = load_model(checkpoints["qwen3"], device="cuda")
    out = rollout.generate(model, PROMPTS, rollout.SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9, stop_ids=range(3, 256, 7)), n=3, seed=0)
    lengths = sorted(len(s.tokens) for group in out for s in group)
    assert lengths[0] < 5 and lengths[-1] >= 6  # rows stopped early and the cache was compacted
    worst = 0.0
    for prompt, group in zip(PROMPTS, out):
        for s in group:
            expected = teacher_forced(model, prompt, s.tokens, 0.7)
            worst = max(worst, (torch.tensor(s.logprobs) - expected).abs().max().item())
    print(f"\nsampler logprobs vs teacher-forced on the GPU: max diff {worst:.2e}")
    assert worst < 1e-4


OTHER = [[9, 8, 7, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [44], [60, 61, 62]]  # PROMPTS' shape


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)])
def test_compiled_decode_with_cuda_graphs_gives_the_same_samples_and_replays(checkpoints, settings):
    """mode="reduce-overhead": the decode step (model forward, sampler, bookkeeping: one graph) replays as
    one CUDA graph per step on fixed-shape buffers. Same samples as eager decoding (rows stopping; eager
    drops finished rows at the host's reads), and a second call of the same shape (other prompts) reuses
    the buffers: nothing is compiled or recorded again."""
    model = load_model(checkpoints["qwen3"], device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead")
    events = []

    def on_start(args):
        events.append(args.callback_trigger.name)
    torch._dynamo.callback.on_compile_start(on_start)
    counters.clear()
    sampling = rollout.SamplingParams(max_new_tokens=10, stop_ids=tuple(range(3, 256, 7)), sync_every=3, **settings)
    try:
        for prompts, seed in [(PROMPTS, 5), (OTHER, 6)]:
            eager, comp = (rollout.generate(m, prompts, sampling, n=3, seed=seed) for m in (model, compiled))
            assert [[s.tokens for s in g] for g in comp] == [[s.tokens for s in g] for g in eager]
            diff = max(abs(x - y) for g, h in zip(comp, eager) for a, b in zip(g, h)
                       for x, y in zip(a.logprobs, b.logprobs))
            print(f"\ncompiled (CUDA graphs) vs eager decode, {settings}, seed {seed}: same tokens, "
                  f"max logprob diff {diff:.2e}; compile/record events so far {events}")
            assert diff < 1e-4
            if seed == 5:
                first = list(events)
        assert "CUDAGRAPH_RECORDING" in first and events == first  # the second call replayed only
    finally:
        torch._dynamo.callback.callback_handler.remove_start_callback(on_start)
    print(f"inductor counters: {dict(counters['inductor'])}")
    assert counters["inductor"]["cudagraph_skips"] == 0  # the decode step did run as a CUDA graph


@torch.inference_mode()
def test_decode_step_makes_no_host_sync(tmp_path):
    """The decode step, run eagerly in its compiled form (graph=True), under CUDA's sync check: any
    operation that waits for the GPU (an .item(), a bool mask index, a host copy) raises. A vocabulary
    larger than rollout.NUCLEUS_PROBE, so that top-p alone takes its probe-or-sort path."""
    model = load_model(make_checkpoint("qwen3", tmp_path / "v1000", seed=3, vocab_size=1000), device="cuda")
    prompt_cache = model.setup_cache(len(PROMPTS), rollout.PREFIX_BUCKET)
    last = rollout.prefill(model, PROMPTS, prompt_cache)
    counts = [3, 2, 1, 2]
    cache = PrefixSharedCache(prompt_cache, [len(p) for p in PROMPTS], counts, 10, static=True)
    row_prompt = torch.repeat_interleave(torch.arange(4), torch.tensor(counts)).cuda()
    state = rollout.DecodeState.allocate(8, 10, model.args.vocab_size, "cuda")
    state.start(torch.tensor([len(p) for p in PROMPTS], device="cuda")[row_prompt], [7, 100])
    rollout.record_tokens(state, *rollout.sample_tokens(last[row_prompt], temperature=0.0))
    u = torch.rand(8, 1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 20, 0.9), (0.8, 0, 0.9), (0.0, 0, 1.0)]:
            rollout.decode_step(model, state, cache, u, temperature, top_k, top_p, graph=True)
        with pytest.raises(RuntimeError, match="synchroniz"):  # the check does catch a host read
            state.running.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert state.step.item() == 4
