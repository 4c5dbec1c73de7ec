"""
SFT training throughput: sft.py's loop vs TRL's SFTTrainer, on the same tiny model, SFT chats, batch,
sequence length, optimizer and schedule, in one run; plus the peak memory of both.

    python bench/sft.py [--steps 30] [--warmup 3] [--batch-size 16] [--users 800] [--repeats 2] [--device cpu]
    python bench/sft.py --smoke       # CI: a 2x64 student, 8 chats, 2 steps of 2; TRL only if installed

Data: profilebench users rendered with confprofile.render_prompt, answered once by the simulated
teacher (the demo's SFT chats, ~250 tokens each). Model: the demo student (sft.build_demo_student:
Qwen3, 4 layers, hidden 256, vocab 4096, tokenizer trained on those chats). Both sides: fp32 (bf16
autocast on CUDA for both), loss on the assistant answer only (ours: the template-derived mask; TRL:
prompt/completion data, completion_only_loss), AdamW (0.9, 0.95), lr 1e-3 with 2 warmup steps and
cosine, grad clip 1.0, one micro-batch of --batch-size per step, no gradient checkpointing, no eval,
no checkpoints. Each side keeps its own batching: ours groups similar lengths (sft.py's default),
TRL its default random order; both pad to the longest in the batch.

tokens/s = non-pad tokens of the timed steps / their wall time (everything between the end of the
last warm-up step and the end of the last step: data, forward, backward, optimizer, logging).

TRL is not a dependency of this project: on first use the benchmark creates a separate virtual
environment (--trl-venv, default /tmp/trl-venv, shared with bench/grpo.py) with pip install
torch==2.13.0 transformers==5.24.0 trl==1.16.0 (it sees this environment's packages, so the pinned
torch and transformers are the very same). Each side runs in a fresh process, so peak memory (max RSS
on CPU, torch.cuda.max_memory_allocated on CUDA) is its own.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchlib import make_chats, peak_memory_mb  # noqa: E402

TRL_PINS = ["torch==2.13.0", "transformers==5.24.0", "trl==1.16.0", "datasets", "accelerate"]
LR, WARMUP, BETAS, CLIP, SEED = 1e-3, 2, (0.9, 0.95), 1.0, 0
DEMO_STUDENT = dict(vocab_size=4096, hidden=256, layers=4)  # sft.build_demo_student's defaults
SMOKE_STUDENT = dict(vocab_size=2048, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128)


def timed_throughput(step_ends, step_tokens, warmup):
    """tokens/s over the steps after `warmup`: their tokens / (end of last step - end of last warm-up step)."""
    seconds = step_ends[-1] - step_ends[warmup - 1]
    return sum(step_tokens[warmup:]) / seconds, seconds


# -----------------------------------------------------------------------------
# Setup (this environment): the chats and the model


def installed_trl(venv):
    """The python of `venv` if TRL is installed there, else None (nothing is installed)."""
    python = os.path.join(venv, "bin", "python")
    ok = os.path.exists(python) and subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0
    return python if ok else None


def ensure_trl(venv):
    python = os.path.join(venv, "bin", "python")
    if os.path.exists(python) and subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0:
        return python
    print(f"installing TRL into {venv} (once; not a project dependency) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    return python


# -----------------------------------------------------------------------------
# The two workers (each in its own process); each prints one JSON line


def worker_ours(a):
    sys.path.insert(0, ROOT)
    import sft
    out = os.path.join(a.work, "ours")
    argv = [f"--model={a.model}", f"--data={a.data}", f"--output_dir={out}", "--overwrite",  # each repeat replaces the last
            f"--max_steps={a.steps + a.warmup}",
            f"--batch_size={a.batch_size}", "--grad_accum=1", f"--max_len={a.max_len}", f"--lr={LR}",
            f"--warmup_steps={WARMUP}", "--min_lr_ratio=0.0", f"--adam_beta1={BETAS[0]}", f"--adam_beta2={BETAS[1]}",
            f"--grad_clip={CLIP}", "--weight_decay=0.0", f"--seed={SEED}", "--eval_fraction=0", "--eval_every=0",
            "--save_every=0", "--log_every=1", f"--device={a.device}"]
    sft.main(argv)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    step_ends, t = [], 0.0
    for r in records:
        t += r["seconds"]
        step_ends.append(t)
    tps, seconds = timed_throughput(step_ends, [r["tokens"] for r in records], a.warmup)
    print(json.dumps({"tokens_per_s": tps, "seconds": seconds, "mean_loss": sum(r["loss"] for r in records) / len(records),
                      "peak_mb": peak_memory_mb(a.device)}), flush=True)


def worker_trl(a):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    with open(a.data, encoding="utf-8") as f:
        chats = [json.loads(line)["messages"] for line in f]
    data = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in chats])
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    config = SFTConfig(output_dir=os.path.join(a.work, "trl"), max_steps=a.steps + a.warmup,
                       per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1, max_length=a.max_len,
                       learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="cosine", adam_beta1=BETAS[0],
                       adam_beta2=BETAS[1], max_grad_norm=CLIP, weight_decay=0.0, seed=SEED, logging_steps=1,
                       save_strategy="no", eval_strategy="no", report_to="none", bf16=a.device == "cuda",
                       use_cpu=a.device == "cpu", completion_only_loss=True, packing=False, dataloader_num_workers=0,
                       gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)

    step_tokens, step_ends, pending = [], [], []
    collate = trainer.data_collator

    def counting_collator(examples):  # non-pad tokens of every batch the trainer draws
        batch = collate(examples)
        pending.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel()))
        return batch

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())
            step_tokens.append(pending.pop(0))

    trainer.data_collator = counting_collator
    trainer.add_callback(StepTimer())
    result = trainer.train()
    tps, seconds = timed_throughput(step_ends, step_tokens, a.warmup)
    print(json.dumps({"tokens_per_s": tps, "seconds": seconds, "mean_loss": result.training_loss,
                      "peak_mb": peak_memory_mb(a.device)}), flush=True)


# -----------------------------------------------------------------------------


def run_worker(python, name, a):
    cmd = [python, os.path.abspath(__file__), "--worker", name, "--model", a.model, "--data", a.data, "--work", a.work,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size", str(a.batch_size),
           "--max-len", str(a.max_len), "--device", a.device]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"bench/sft.py: the {name} worker failed:\n{r.stderr[-4000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.time() - t0
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (one micro-batch)")
    p.add_argument("--users", type=int, default=800, help="SFT chats in the data set")
    p.add_argument("--max-len", type=int, default=1024, help="max sequence length (both sides)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--repeats", type=int, default=2, help="alternate ours/TRL this many times; keep each side's best")
    p.add_argument("--trl-venv", default="/tmp/trl-venv", help="where TRL is installed (created if missing)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, TRL only if it is installed already (CI: the "
                   "benchmark still runs)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return {"ours": worker_ours, "trl": worker_trl}[a.worker](a)

    student = DEMO_STUDENT
    if a.smoke:
        a.steps, a.warmup, a.batch_size, a.users, a.max_len, a.repeats = 2, 1, 2, 8, 1024, 1
        student = SMOKE_STUDENT
    trl_python = installed_trl(a.trl_venv) if a.smoke else ensure_trl(a.trl_venv)
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as work:
        a.work, a.data, a.model = work, os.path.join(work, "sft.jsonl"), os.path.join(work, "student")
        make_chats(a.data, a.users)
        sys.path.insert(0, ROOT)
        from sft import build_demo_student, corpus_texts
        build_demo_student(corpus_texts([a.data]), a.model, seed=SEED, **student)
        runs = {"ours": [], "trl": []}
        for _ in range(a.repeats):  # alternating, best of each: load spikes on a shared machine hit both sides
            runs["ours"].append(run_worker(sys.executable, "ours", a))
            if trl_python:
                runs["trl"].append(run_worker(trl_python, "trl", a))
        ours = max(runs["ours"], key=lambda r: r["tokens_per_s"])
        trl = max(runs["trl"], key=lambda r: r["tokens_per_s"]) if trl_python else None

    print(f"\nSFT throughput, {a.device}, {'smoke' if a.smoke else 'demo'} student (Qwen3 {student['layers']}x"
          f"{student['hidden']}, vocab {student['vocab_size']}), batch {a.batch_size}, "
          f"{a.steps} timed steps after {a.warmup} warm-up, {a.users} chats (~250 tokens), best of {a.repeats}")
    print(f"{'':18}{'tokens/s':>10}{'timed s':>10}{'peak MB':>10}{'mean loss':>12}")
    for name, r in (("ours (sft.py)", ours), ("TRL SFTTrainer", trl)):
        if r is None:
            print(f"{name:18}skipped: TRL is not installed in {a.trl_venv} (--smoke never installs it)")
            continue
        print(f"{name:18}{r['tokens_per_s']:>10.0f}{r['seconds']:>10.1f}{r['peak_mb']:>10.0f}{r['mean_loss']:>12.3f}")
    if trl is None:
        return None
    ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
    print(f"ratio ours / TRL: {ratio:.2f}x (target >= 1.2x)")
    return ratio


if __name__ == "__main__":
    main()
