"""
Peak memory of full vs LoRA SFT of SmolLM2-135M-Instruct on this machine: sft.py itself for a few steps,
each run in a fresh process so that its peak is its own; with --peer-venv, TRL's SFTTrainer (full, and
LoRA through PEFT) on the same model, chats, batch, rank and targets, side by side.

    python bench/smollm2_checkpoint.py --out runs/smollm2/base
    python bench/lora_memory.py --model runs/smollm2/base [--steps 4] [--batch-size 4] [--rank 16] \
        [--peer-venv /tmp/peer15] [--gradient-checkpointing]
    python bench/lora_memory.py --smoke [--peer-venv /tmp/peer15]   # CI: a 2x64 student built on the fly

Peak = max RSS of the process on CPU (the Python interpreter, torch and the tokenizer included: the
"load only" row is that floor plus the weights), torch.cuda.max_memory_allocated on CUDA. Our runs stop
after the last step without writing the final checkpoint (stop_after_steps), TRL's with save_strategy
"no": the figures are those of training. Writing a LoRA run's merged checkpoint costs one more copy of
the targeted matrices on the CPU while it is written (merged_state_dict), not counted here.

Data: profilebench users rendered with confprofile.render_prompt, answered once by the simulated
teacher (the demo's SFT chats, ~650 SmolLM2 tokens each); loss on the answer only on both sides. fp32,
AdamW, lr 1e-4, no eval. s/step is the mean wall time of the steps after the first.

TRL and PEFT are not dependencies of this project: --peer-venv names a virtual environment where
`import trl, peft` works and this environment's torch and transformers are seen, e.g.
    python3 -m venv /tmp/peer15
    echo "$(python -c 'import site; print(site.getsitepackages()[0])')" > /tmp/peer15/lib/python3.11/site-packages/work.pth
    /tmp/peer15/bin/pip install trl peft
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, MAX_LEN, SEED = 1e-4, 2048, 0
SMOKE_STUDENT = dict(vocab_size=2048, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128)


# -----------------------------------------------------------------------------
# The workers (each in its own process); each prints one JSON line


def worker_load(a):
    import torch
    sys.path.insert(0, ROOT)
    from model import load_model
    model = load_model(a.model, device=a.device)
    with torch.no_grad():  # every weight read once: memory-mapped pages count once they are touched
        sum(p.sum() for p in model.parameters())
    del model
    print(json.dumps({"peak_mb": peak_memory_mb(a.device), "s_per_step": None}), flush=True)


def worker_ours(a, lora):
    sys.path.insert(0, ROOT)
    import sft
    out = os.path.join(a.work, f"ours_{'lora' if lora else 'full'}")
    argv = [f"--model={a.model}", f"--data={a.data}", f"--output_dir={out}", f"--max_steps={a.steps + 1}",
            f"--stop_after_steps={a.steps}", f"--batch_size={a.batch_size}", "--grad_accum=1", f"--max_len={MAX_LEN}",
            f"--lr={LR}", "--warmup_steps=0", "--weight_decay=0.0", f"--seed={SEED}", "--eval_fraction=0",
            "--eval_every=0", "--save_every=0", f"--device={a.device}",
            f"--gradient_checkpointing={str(a.gradient_checkpointing).lower()}"]
    if lora:
        argv += [f"--lora_rank={a.rank}", f"--lora_alpha={2 * a.rank}", f"--lora_targets={json.dumps(TARGETS)}"]
    assert sft.main(argv) is None  # stopped one step before the end: no final checkpoint is written
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    steps = [r["seconds"] for r in records[1:]]
    print(json.dumps({"peak_mb": peak_memory_mb(a.device), "s_per_step": sum(steps) / len(steps), "loss": records[-1]["loss"]}), flush=True)


def worker_peer(a, lora):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    with open(a.data, encoding="utf-8") as f:
        chats = [json.loads(line)["messages"] for line in f]
    data = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in chats])
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    peft_config = None
    if lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=TARGETS,
                                 task_type="CAUSAL_LM")
    config = SFTConfig(output_dir=os.path.join(a.work, "peer"), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                       gradient_accumulation_steps=1, max_length=MAX_LEN, learning_rate=LR, warmup_steps=0,
                       weight_decay=0.0, seed=SEED, logging_steps=1, save_strategy="no", eval_strategy="no",
                       report_to="none", use_cpu=a.device == "cpu", completion_only_loss=True, packing=False,
                       dataloader_num_workers=0, gradient_checkpointing=a.gradient_checkpointing)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    ends = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    trainer.add_callback(StepTimer())
    result = trainer.train()
    print(json.dumps({"peak_mb": peak_memory_mb(a.device), "s_per_step": (ends[-1] - ends[0]) / (len(ends) - 1), "loss": result.training_loss}), flush=True)


WORKERS = {"load": worker_load, "ours_full": lambda a: worker_ours(a, False), "ours_lora": lambda a: worker_ours(a, True),
           "peer_full": lambda a: worker_peer(a, False), "peer_lora": lambda a: worker_peer(a, True)}


# -----------------------------------------------------------------------------


def run_worker(python, name, a):
    cmd = [python, os.path.abspath(__file__), "--worker", name, "--model", a.model, "--data", a.data, "--work", a.work,
           "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--rank", str(a.rank), "--device", a.device]
    if a.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"bench/lora_memory.py: the {name} worker failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--model", default="runs/smollm2/base", help="an HF checkpoint dir (bench/smollm2_checkpoint.py)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (s/step: all but the first)")
    p.add_argument("--batch-size", type=int, default=4, help="chats per step (one micro-batch)")
    p.add_argument("--users", type=int, default=64, help="SFT chats in the data set")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank) on all seven Linear layers")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--peer-venv", default="", help="a venv with trl and peft (see the docstring); empty: ours only")
    p.add_argument("--smoke", action="store_true", help="a tiny student (sft.build_demo_student, 2 layers x 64) "
                   "instead of --model, 8 chats, 2 steps of 2, rank 4; the peer only if --peer-venv has trl and "
                   "peft (CI: the benchmark still runs)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return WORKERS[a.worker](a)
    if a.smoke:
        a.users, a.steps, a.batch_size, a.rank = 8, 2, 2, 4
    if a.steps < 2:
        sys.exit("bench/lora_memory.py: error: --steps: expected at least 2")
    a.model = os.path.abspath(a.model)
    if not a.smoke and not os.path.exists(os.path.join(a.model, "config.json")):
        sys.exit(f"bench/lora_memory.py: error: {a.model}: no checkpoint there (python bench/smollm2_checkpoint.py)")
    peer_python = os.path.join(a.peer_venv, "bin", "python") if a.peer_venv else None
    if a.smoke and peer_python and not (os.path.exists(peer_python) and subprocess.run(
            [peer_python, "-c", "import trl, peft, datasets"], capture_output=True).returncode == 0):
        peer_python = None
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as work:
        a.work, a.data = work, os.path.join(work, "sft.jsonl")
        make_chats(a.data, a.users)
        if a.smoke:
            sys.path.insert(0, ROOT)
            from sft import build_demo_student, corpus_texts
            a.model = os.path.join(work, "student")
            build_demo_student(corpus_texts([a.data]), a.model, seed=SEED, **SMOKE_STUDENT)
        rows = [("load only (ours)", run_worker(sys.executable, "load", a)),
                ("ours, full SFT", run_worker(sys.executable, "ours_full", a)),
                (f"ours, LoRA r={a.rank}", run_worker(sys.executable, "ours_lora", a))]
        if peer_python:
            rows += [("TRL, full SFT", run_worker(peer_python, "peer_full", a)),
                     (f"TRL + PEFT, LoRA r={a.rank}", run_worker(peer_python, "peer_lora", a))]

    print(f"\nSFT peak memory, {a.device}, {os.path.basename(a.model)}, batch {a.batch_size} chats (~650 tokens), "
          f"{a.steps} steps, fp32, gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}")
    print(f"{'':28}{'peak MB':>10}{'s/step':>10}")
    for name, r in rows:
        step = "" if r["s_per_step"] is None else f"{r['s_per_step']:.3g}"  # 3 digits: a tiny smoke step rounds to 0.0 at .1f
        print(f"{name:28}{r['peak_mb']:>10.0f}{step:>10}")
    if not peer_python:
        why = f"trl, peft or datasets is not installed in {a.peer_venv}" if a.peer_venv else "no --peer-venv given"
        print(f"TRL / PEFT: skipped: {why}")
    base = rows[0][1]["peak_mb"]
    for name, r in rows[1:]:
        print(f"{name}: {r['peak_mb'] - base:+.0f} MB over load only")


if __name__ == "__main__":
    main()
