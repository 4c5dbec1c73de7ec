"""
Seconds per GRPO step: rl.py's grpo_step vs TRL's GRPOTrainer (HF generate, no vLLM), on the same tiny
model, prompts, G, completion length, optimizer and loss, in one run; plus the peak memory of both.

    python bench/grpo.py [--steps 5] [--users 4] [--generations 8] [--new-tokens 64] [--device cpu] [--repeats 2]
    python bench/grpo.py --smoke      # CI: B=2, G=2, 4 new tokens, one timed step; TRL only if installed

One GRPO step = sample G completions for each of B prompts, score them, compute advantages, one
forward/backward over the B*G rollouts in one micro-batch, one AdamW step. Both sides: fp32, no
gradient checkpointing, beta = 0 (no reference model), loss_type dapo, epsilon 0.2 / 0.28, temperature
1, no top-k/top-p, every completion exactly --new-tokens long (we pass no stop ids; TRL gets
min_new_tokens), the reward = share of completion tokens equal to one id. The first step of each is a
warm-up and is not timed.

TRL is not a dependency of this project: on first use the benchmark creates a separate virtual
environment (--trl-venv, default /tmp/trl-venv) with pip install torch==2.13.0 transformers==5.24.0
trl==1.16.0, and runs TRL there. Each side runs in a fresh process, so peak memory (max RSS on CPU,
torch.cuda.max_memory_allocated on CUDA) is its own.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchlib import peak_memory_mb  # noqa: E402

TRL_PINS = ["torch==2.13.0", "transformers==5.24.0", "trl==1.16.0", "datasets", "accelerate"]
TARGET_ID_TEXT = "e"  # the toy reward counts this token


def build_model(out_dir):
    """The demo-size student: byte-level BPE tokenizer + ChatML, Qwen3 with 4 layers, hidden 256."""
    sys.path.insert(0, ROOT)
    from sft import build_demo_student
    words = ("user watched searched posted makeup football tutorial recipe travel startup coding exam baby "
             "wedding retirement office nurse teacher engineer farmer student manager designer").split()
    texts = [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(40)) for i in range(300)]
    build_demo_student(texts, out_dir, vocab_size=2048, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64,
                       intermediate=768, seed=0)


def prompt_texts(n_users, n_words):
    words = "the user watched cooking videos and searched for football tickets then posted about travel".split()
    return [" ".join(words[(u * 5 + k) % len(words)] for k in range(n_words)) for u in range(n_users)]


# -----------------------------------------------------------------------------
# The two workers (each in its own process)


def run_ours(args):
    sys.path.insert(0, ROOT)
    import torch

    import rl
    import rl_bookkeeping
    from common import load_tokenizer
    from model import load_model
    from trainer import build_optimizer
    torch.manual_seed(0)
    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.model_dir)
    target = tokenizer.convert_tokens_to_ids(TARGET_ID_TEXT)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts(args.users, args.prompt_words)]
    model = load_model(args.model_dir, device=device)
    cfg = rl.RLConfig(output_dir=tempfile.mkdtemp(), batch_size=args.users, num_generations=args.generations,
                      max_new_tokens=args.new_tokens, micro_batch_size=args.users * args.generations, lr=1e-5,
                      loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, weight_decay=0.0)
    optimizer = build_optimizer(model, cfg)

    def step(generator):
        """rl.grpo_step's GRPO phases (rollouts, advantages, policy update) with TRL's toy reward in place of
        the Conf-Profile phases (a random model never writes a profile that parses)."""
        t0 = time.perf_counter()
        groups = rl.sample_groups(model, prompts, cfg, generator, [])
        t_rollout = time.perf_counter() - t0
        rewards = torch.tensor([[sum(t == target for t in s.tokens) / len(s.tokens) for s in g] for g in groups])
        keep, masks = [True] * len(groups), [[[1] * len(s.tokens) for s in g] for g in groups]
        batch = rl.training_batch(groups, prompts, rewards, keep, (masks, None), cfg)
        t1 = time.perf_counter()
        sums, grad_norm, stepped = rl.policy_update(model, None, optimizer, batch, cfg, cfg.lr)
        return rl_bookkeeping.step_metrics(groups, rewards, rl.flat_groups(rewards), keep, {}, sums, grad_norm, stepped,
                                           cfg.lr, cfg, t_rollout, time.perf_counter() - t1, device)

    times = []
    for index in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = step(torch.Generator(device=device).manual_seed(index))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert m["completion_len"] == args.new_tokens
    return {"step_s": times[1:], "rollout_s": m["rollout_s"], "train_s": m["train_s"],
            "peak_mb": peak_memory_mb(device.type), "prompt_tokens": [len(p) for p in prompts]}


def run_trl(args):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    target = tokenizer.convert_tokens_to_ids(TARGET_ID_TEXT)
    texts = prompt_texts(args.users, args.prompt_words)

    def reward(completions, completion_ids, **kwargs):
        return [sum(t == target for t in ids) / max(len(ids), 1) for ids in completion_ids]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0, self.lengths = [], None, []

        def on_step_begin(self, a, state, control, **kw):
            if torch.cuda.is_available() and args.device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available() and args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps + 1, per_device_train_batch_size=args.users * args.generations,
        gradient_accumulation_steps=1, num_generations=args.generations, max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, beta=0.0,
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, num_iterations=1, scale_rewards="group",
        gradient_checkpointing=False, bf16=False, use_cpu=args.device == "cpu", use_vllm=False, logging_steps=1,
        report_to="none", save_strategy="no", shuffle_dataset=False, disable_tqdm=True, seed=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=args.model_dir, reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                          callbacks=[timer])
    trainer.train()
    assert all(abs(n - args.new_tokens) < 1e-6 for n in timer.lengths), timer.lengths
    return {"step_s": timer.times[1:], "peak_mb": peak_memory_mb(args.device),
            "prompt_tokens": [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]}


# -----------------------------------------------------------------------------
# The driver


def ensure_trl_venv(venv):
    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", "import trl, datasets, accelerate"]
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with {' '.join(TRL_PINS)} (once; TRL is not a project dependency)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    return python


def installed_trl(venv):
    """The python of `venv` if TRL is installed there, else None (nothing is installed)."""
    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", "import trl, datasets, accelerate"]
    return python if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0 else None


def worker(python, which, args, model_dir):
    cmd = [python, os.path.abspath(__file__), "--worker", which, "--model-dir", model_dir]
    for key in ("steps", "users", "generations", "new_tokens", "prompt_words", "device", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"bench/grpo.py: the {which} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--users", type=int, default=4, help="B prompts per step")
    p.add_argument("--generations", type=int, default=8, help="G completions per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="completion length (forced on both sides)")
    p.add_argument("--prompt-words", type=int, default=48, help="words per prompt")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (0 = torch's default; 1 avoids "
                   "OpenMP oversubscription on a shared machine, which can slow a tiny model 10x)")
    p.add_argument("--repeats", type=int, default=2, help="alternate ours/TRL this many times; each side's best run counts")
    p.add_argument("--trl-venv", default="/tmp/trl-venv", help="where TRL is installed (created on first use)")
    p.add_argument("--model-dir", default="", help="reuse a model dir (default: build the demo-size model)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one timed step, TRL only if it is installed "
                   "already (CI: the benchmark still runs)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.users, args.generations, args.new_tokens, args.prompt_words, args.repeats = 1, 2, 2, 4, 4, 1
    if args.worker:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_ours(args) if args.worker == "ours" else run_trl(args)
        print(json.dumps(result))
        return

    trl_python = installed_trl(args.trl_venv) if args.smoke else ensure_trl_venv(args.trl_venv)
    model_dir = args.model_dir or os.path.join(tempfile.mkdtemp(), "model")
    if not args.model_dir:
        build_model(model_dir)
    def mean(xs):
        return sum(xs) / len(xs)

    runs = {"ours": [], "trl": []}
    for _ in range(args.repeats):  # alternate, so a load spike from other processes hits both sides
        runs["ours"].append(worker(sys.executable, "ours", args, model_dir))
        if trl_python:
            runs["trl"].append(worker(trl_python, "trl", args, model_dir))
    ours = min(runs["ours"], key=lambda r: mean(r["step_s"]))
    trl = min(runs["trl"], key=lambda r: mean(r["step_s"])) if trl_python else None
    assert trl is None or ours["prompt_tokens"] == trl["prompt_tokens"], (ours["prompt_tokens"], trl["prompt_tokens"])

    rows = args.users * args.generations
    print(f"GRPO step, {args.device}: demo-size Qwen3 (4 layers, hidden 256, vocab 2048), B={args.users} prompts of "
          f"{min(ours['prompt_tokens'])}-{max(ours['prompt_tokens'])} tokens x G={args.generations}, "
          f"{args.new_tokens} new tokens each, fp32, {args.threads or 'default'} thread(s), best of {args.repeats} x "
          f"{args.steps} timed steps")
    print(f"{'':<28}{'s/step':>10}{'rollouts/s':>12}{'peak MB':>10}")
    for name, r in (("ours (rl.py GRPO phases)", ours), ("TRL GRPOTrainer 1.16.0", trl)):
        if r is None:
            print(f"{name:<28}skipped: TRL is not installed in {args.trl_venv} (--smoke never installs it)")
            continue
        print(f"{name:<28}{mean(r['step_s']):>10.3f}{rows / mean(r['step_s']):>12.1f}{r['peak_mb']:>10.0f}")
    if trl is not None:
        print(f"speed-up: {mean(trl['step_s']) / mean(ours['step_s']):.2f}x", end="  ")
    print(f"(ours: rollout {ours['rollout_s']:.3f}s + train {ours['train_s']:.3f}s in the last step)")


if __name__ == "__main__":
    main()
