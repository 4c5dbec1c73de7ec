"""
Stage 1 distillation (docs/design.md, "Stage 1"): supervised fine-tuning of the student on the SFT
set that calibrate.py writes, one chat per user: [system, user prompt, assistant answer with label,
calibrated confidence and evidence per dimension].

    python sft.py                                        # the CPU demo: configs/sft_demo.json
    python sft.py --config configs/sft_qwen3_8b.json --lr 5e-6
    python sft.py --resume                               # continue from output_dir/train_state (same settings)
    torchrun --nproc_per_node=K sft.py --config ...      # data-parallel (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=K sft.py --parallel fsdp   # sharded data-parallel (FSDP2): docs/fsdp.md

What it does, and why:
* Loss = mean next-token NLL over the assistant answer tokens only, *including* the end-of-turn token,
  so the student learns to stop. Which tokens those are comes from the checkpoint's own chat template
  (`assistant_mask`), never from hand-written role markers, so Qwen3's `<think>` handling, Llama's
  headers etc. are whatever the template says; the end-of-turn tokens are the sampler's stop tokens
  (common.stop_ids_for), so the student learns to stop exactly where generation stops.
* `batch_size` is the GLOBAL number of sequences per optimizer step. The global batch is cut into
  world_size * grad_accum length-sorted micro-batches, and every token's loss is divided by the
  global batch's answer-token count: one process, gradient accumulation and K processes give the
  same update (up to float summation order).
* The data order is a pure function of (seed, epoch), so the data position is just the step number,
  and a checkpoint (model, optimizer, step, RNG) resumes bit-exactly. Reading the records, the held-out
  split, the epoch order, micro-batches and padding are sft_data.py's.
* The final checkpoint is `output_dir` itself, an HF directory that transformers, rollout.py and rl.py
  load as is; beside it sft_config.json (the resolved config), metrics.jsonl (drawn at the end in
  training_curves.png: train and eval loss) and, until the run finishes, train_state/.
* `init_student: true` first builds the demo student at `model` (profilebench.build_demo_student).
* The rest is the training harness's (trainer.py): resume and its guards, processes and FSDP2
  (`parallel`, docs/fsdp.md), bf16 with stochastic rounding (`dtype`), LoRA (`lora_rank`: only the
  adapters train, merged into the final checkpoint; docs/design.md, "LoRA").
"""
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import ConfigError, load_tokenizer, neutralize_messages, opt, run_cli, stop_ids_for
from distributed import PARALLEL, all_reduce_sum, barrier, cleanup_distributed, is_sharded
from profilebench import build_demo_student, corpus_texts
from sft_data import SFTData, local_micro_batches, pad_batch, read_chats, split_eval
from trainer import RESUME_MAY_CHANGE as TRAINER_MAY_CHANGE
from trainer import (TrainingConfig, announce, autocast_for, build_policy, finish, guard_output_dir, hold_output_dir,
                     optimizer_step, shard, start, train)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sft_demo.json")


@dataclass
class SFTKeys:
    """What SFT trains on what: the keys of its own (TrainingConfig adds the optimiser and runtime ones)."""
    model: str = opt("runs/demo/student_init", "HF checkpoint dir of the student (built here first with --init-student)",
                     nonempty=True)
    data: str = opt("runs/demo/sft.jsonl", "SFT records from calibrate.py: {user_id, messages: [system, user, "
                    "assistant]}", nonempty=True)
    eval_data: str = opt("", "held-out records in the same format; empty: hold out eval_fraction of data")
    eval_fraction: float = opt(0.02, "share of data held out for the eval loss when eval_data is empty", min=0, lt=1)
    output_dir: str = opt("runs/demo/sft", "the final HF checkpoint, sft_config.json, metrics.jsonl, train_state/",
                          nonempty=True)
    chat_template_kwargs: dict = opt({}, 'passed to the chat template, e.g. {"enable_thinking": false}; use the same '
                                     "at inference")
    # the demo student
    init_student: bool = opt(False, "build the tiny from-scratch demo student at `model` unless one is there")
    student_corpus: list = opt([], "JSONL files whose texts train its BPE tokenizer (empty: data)", items=str)
    student_vocab_size: int = opt(4096, "demo student: BPE vocabulary size", min=1)
    student_hidden: int = opt(256, "demo student: hidden size", min=1)
    student_layers: int = opt(4, "demo student: layers", min=1)
    student_heads: int = opt(4, "demo student: attention heads", min=1)
    student_kv_heads: int = opt(2, "demo student: key/value heads (grouped-query attention)", min=1)
    student_head_dim: int = opt(64, "demo student: head dimension", min=1)
    student_intermediate: int = opt(768, "demo student: MLP intermediate size", min=1)
    # batches
    max_steps: int = opt(0, "optimizer steps; > 0 overrides epochs", min=0)
    epochs: float = opt(1.0, "passes over the training records (when max_steps is 0)", min=0)
    batch_size: int = opt(32, "chats per optimizer step, all processes together", min=1)
    grad_accum: int = opt(1, "micro-batches per process per step (gradient accumulation)", min=1)
    max_len: int = opt(1024, "longer records are left out (and counted)", min=2)
    length_group: int = opt(16, "sort by length within windows of this many batches (less padding)", min=1)
    seed: int = opt(0, "data order, held-out split and the demo student's init", min=0)


@dataclass
class SFTConfig(TrainingConfig, SFTKeys):
    WHERE = "sft config"
    HELP_ORDER = tuple("""model data eval_data eval_fraction output_dir chat_template_kwargs init_student student_corpus
        student_vocab_size student_hidden student_layers student_heads student_kv_heads student_head_dim
        student_intermediate max_steps epochs lr warmup_steps min_lr_ratio weight_decay adam_beta1 adam_beta2 grad_clip
        batch_size grad_accum max_len length_group seed lora_rank lora_alpha lora_dropout lora_targets lora_save_adapter
        dtype device parallel gradient_checkpointing eval_every save_every log_every resume force_resume overwrite
        stop_after_steps""".split())
    lora_rank: int = opt(0, "LoRA rank r: train low-rank adapters on lora_targets, the base frozen; 0 = full "
                         "fine-tuning", min=0)
    lora_dropout: float = opt(0.0, "dropout on the adapters' input in training", min=0, lt=1)
    parallel: str = opt("ddp", "under torchrun: ddp (each process a full copy, gradients all-reduced) or fsdp "
                        "(FSDP2: parameters, gradients and AdamW moments sharded over the processes)", choices=PARALLEL)
    eval_every: int = opt(50, "steps between held-out evals (0 = only at the end)", min=0)
    save_every: int = opt(100, "steps between resumable checkpoints (0 = never)", min=0)
    log_every: int = opt(1, "steps between metrics lines", min=1)
    stop_after_steps: int = opt(0, "leave after this many steps without saving, as if killed (time-sliced jobs, "
                                "the resume test)", min=0)


RESUME_MAY_CHANGE = TRAINER_MAY_CHANGE + ("log_every",)
PATH_KEYS = ("model", "data", "eval_data", "output_dir")  # compared as absolute paths


# -----------------------------------------------------------------------------
# Data: chats -> (input_ids, loss_mask) from the checkpoint's own chat template


def render_chat(tokenizer, messages, **template_kwargs):
    """(prompt, full): the chat without its answer + the generation prompt, and the whole chat.
    Every message is neutralised first (common.neutralize_messages): user text, and the evidence
    quoted in the answer, can never render as one of the tokenizer's control tokens."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("assistant_mask: the last message must be the assistant answer (role 'assistant')")
    messages = neutralize_messages(tokenizer, messages)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, **template_kwargs)
    full = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    if not full.startswith(prompt):
        i = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
        raise ValueError(f"{_name(tokenizer)}: chat template: the chat rendered with its answer does not start with the "
                         f"prompt rendered with add_generation_prompt=True (first difference at char {i}: prompt "
                         f"{prompt[i:i + 40]!r} vs full {full[i:i + 40]!r}); cannot tell which tokens are the answer")
    return prompt, full


def answer_loss_mask(prompt_ids, input_ids, stop_ids, where="chat"):
    """1 from the first answer token through the last end-of-turn token; 0 on the prompt and after."""
    if input_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"{where}: the prompt's tokens change when the answer follows (a merge across the "
                         f"prompt/answer boundary); expected the prompt's tokens to be a prefix of the chat's")
    ends = [i for i in range(len(prompt_ids), len(input_ids)) if input_ids[i] in stop_ids]
    if not ends:
        raise ValueError(f"{where}: the rendered answer has no end-of-turn token (one of {sorted(stop_ids)}); "
                         f"the student could not learn to stop")
    loss_mask = [0] * len(prompt_ids) + [1] * (ends[-1] + 1 - len(prompt_ids)) + [0] * (len(input_ids) - ends[-1] - 1)
    assert sum(loss_mask) > 0, f"{where}: empty SFT loss mask"
    return loss_mask


def assistant_mask(tokenizer, messages, **template_kwargs):
    """SFT loss mask: 1 on the final assistant answer's tokens up to and including its end-of-turn token.

    prompt = template(messages[:-1], add_generation_prompt=True), full = template(messages); the answer
    is what `full` adds after `prompt` (so anything the template puts there -- e.g. Qwen3's empty
    <think></think> block -- is trained, exactly as the model must generate it after that prompt).
    Tokens after the end-of-turn token (the template's trailing newline) are never generated: no loss.
    Returns (input_ids, loss_mask), two lists of the same length.
    Oracle: the fast path (encode_chats, which training runs) is tested against this.
    """
    prompt, full = render_chat(tokenizer, messages, **template_kwargs)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    input_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    return input_ids, answer_loss_mask(prompt_ids, input_ids, set(stop_ids_for(tokenizer)), _name(tokenizer))


def _name(tokenizer):
    return getattr(tokenizer, "name_or_path", "") or "tokenizer"


def encode_chats(tokenizer, records, max_len, template_kwargs, where="data"):
    """assistant_mask for many records (rendered one by one, tokenized in one batch call);
    records longer than max_len are left out and counted. Returns ([(input_ids, loss_mask)], n_too_long)."""
    if not records:
        return [], 0
    rendered = [render_chat(tokenizer, r["messages"], **template_kwargs) for r in records]
    prompt_ids = tokenizer([p for p, _ in rendered], add_special_tokens=False)["input_ids"]
    input_ids = tokenizer([f for _, f in rendered], add_special_tokens=False)["input_ids"]
    stops = set(stop_ids_for(tokenizer))
    examples, too_long = [], 0
    for n, (p, ids) in enumerate(zip(prompt_ids, input_ids)):
        if len(ids) > max_len:
            too_long += 1
            continue
        examples.append((ids, answer_loss_mask(p, ids, stops, f"{where}: record {n + 1}")))
    return examples, too_long


# -----------------------------------------------------------------------------
# Loss


def masked_nll_sum(logits, input_ids, loss_mask):
    """Sum of -log p(x_t | x_<t) over targets t with loss_mask[t] = 1, and their count.
    Logits at position t-1 predict token t; only the masked rows are pushed through the softmax.
    Oracle: the fast path (answer_nll_sum, which training runs) is tested against this."""
    target_mask = loss_mask[:, 1:]
    picked = logits[:, :-1][target_mask]                     # [N, V]
    targets = input_ids[:, 1:][target_mask]                  # [N]
    return F.cross_entropy(picked.float(), targets, reduction="sum"), int(target_mask.sum())


def answer_nll_sum(model, input_ids, loss_mask):
    """masked_nll_sum(model(input_ids), ...) without projecting the prompt onto the vocabulary: the
    model's logits_at keeps only the positions that predict a target (t - 1 for every target t), so the
    vocabulary matmul -- the biggest one of a small model, the biggest activation of a 150k-vocab one --
    runs on the answer tokens only. Returns (sum of NLL, number of targets)."""
    target_mask = loss_mask[:, 1:]
    predicts = F.pad(target_mask, (0, 1))  # position t-1 predicts token t
    with autocast_for(input_ids.device):
        logits = model(input_ids, logits_at=predicts.nonzero(as_tuple=True))  # [N, V]
    targets = input_ids[:, 1:][target_mask]
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(target_mask.sum())


# -----------------------------------------------------------------------------
# Training


@torch.no_grad()
def evaluate_loss(model, examples, micro_size, pad_id, device, rank, world_size, sharded=False):
    """Mean answer-token NLL over held-out examples (each process takes every world_size-th micro-batch).
    sharded: every forward is a collective, so a process with one batch fewer than another runs the
    first batch once more and drops the result."""
    model.eval()
    lengths = [len(ids) for ids, _ in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    batches = [order[j:j + micro_size] for j in range(0, len(order), micro_size)]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = batches[rank::world_size]
    rounds = math.ceil(len(batches) / world_size) if sharded else len(mine)
    for k in range(rounds):
        batch = mine[k] if k < len(mine) else batches[0]
        ids, lm = pad_batch([examples[i][0] for i in batch], [examples[i][1] for i in batch], pad_id, device)
        nll, n = answer_nll_sum(model, ids, lm)
        if k < len(mine):
            total += torch.tensor([nll.item(), n], dtype=torch.float64, device=device)
    all_reduce_sum(total)
    model.train()
    return (total[0] / total[1]).item()


def prepare_student(cfg, rank):
    """init_student: build the demo student at cfg.model unless a checkpoint is already there.
    Only rank 0 looks and builds; every rank then meets at the barrier (a rank that looked itself could
    see rank 0's fresh config.json, skip the barrier and deadlock the others)."""
    if cfg.init_student and rank == 0 and not os.path.exists(os.path.join(cfg.model, "config.json")):
        t0 = time.time()
        texts = corpus_texts(cfg.student_corpus or [cfg.data])
        build_demo_student(texts, cfg.model, vocab_size=cfg.student_vocab_size, hidden=cfg.student_hidden,
                           layers=cfg.student_layers, heads=cfg.student_heads, kv_heads=cfg.student_kv_heads,
                           head_dim=cfg.student_head_dim, intermediate=cfg.student_intermediate, seed=cfg.seed)
        print(f"built the demo student at {cfg.model} ({len(texts)} corpus texts, {time.time() - t0:.1f}s)", flush=True)
    barrier()


def check_config(cfg, world_size):
    n_micro = world_size * cfg.grad_accum
    if cfg.batch_size % n_micro:
        raise ConfigError(f"batch_size {cfg.batch_size}: expected a multiple of world_size * grad_accum = "
                          f"{world_size} * {cfg.grad_accum} (every process takes equal micro-batches)")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise ConfigError("max_steps or epochs: expected one of them > 0")


# -----------------------------------------------------------------------------
# The SFT step


def sft_step(model, optimizer, micro_batches, n_targets, cfg, lr):
    """One optimizer step on this process's micro-batches [(input_ids, loss_mask)] of a global batch.
    Every token's loss is divided by n_targets, the answer-token count of the whole global batch, so the
    gradients summed over micro-batches and processes (trainer.optimizer_step) are those of the global
    token mean. Returns (this process's NLL sum, the gradient norm)."""
    nll_sum = 0.0
    for ids, lm in micro_batches:
        nll, _ = answer_nll_sum(model, ids, lm)
        (nll * (1 / n_targets)).backward()
        nll_sum += nll.item()
    return nll_sum, optimizer_step(model, optimizer, cfg, lr)


# -----------------------------------------------------------------------------
# The run: data, the step's batch and metrics, the held-out measure


def load_data(cfg, tokenizer, env):
    """Read, split and encode the chats; the schedule (steps per epoch, total steps)."""
    records = read_chats(cfg.data)
    if cfg.eval_data:
        train_records, eval_records = records, read_chats(cfg.eval_data)
    else:
        train_records, eval_records = split_eval(records, cfg.eval_fraction, cfg.seed)
    t0 = time.time()
    examples, too_long = encode_chats(tokenizer, train_records, cfg.max_len, cfg.chat_template_kwargs, cfg.data)
    eval_examples, eval_too_long = encode_chats(tokenizer, eval_records, cfg.max_len, cfg.chat_template_kwargs,
                                                cfg.eval_data or cfg.data)
    if len(examples) < cfg.batch_size:
        raise ValueError(f"{cfg.data}: {len(examples)} records fit max_len {cfg.max_len} "
                         f"({too_long} longer left out); expected at least batch_size={cfg.batch_size}")
    steps_per_epoch = len(examples) // cfg.batch_size
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = SFTData(examples, eval_examples, pad_id, steps_per_epoch, total, [len(ids) for ids, _ in examples],
                   [sum(mask[1:]) for _, mask in examples])  # answer tokens that are predicted (never position 0)
    if env.main:
        n_tok, n_micro = sum(data.lengths), env.world_size * cfg.grad_accum
        print(f"data: {len(examples)} train / {len(eval_examples)} eval chats, {n_tok} tokens "
              f"({sum(sum(m) for _, m in examples)} answer tokens, mean length {n_tok / len(examples):.0f}); "
              f"left out as longer than max_len={cfg.max_len}: {too_long} train, {eval_too_long} eval; "
              f"tokenized in {time.time() - t0:.1f}s", flush=True)
        print(f"schedule: {total} steps x {cfg.batch_size} chats ({steps_per_epoch} steps/epoch), "
              f"{env.world_size} process(es) x {cfg.grad_accum} micro-batch(es) of {cfg.batch_size // n_micro}",
              flush=True)
    return data


def train_step(model, optimizer, step, lr, data, cfg, env, meter):
    """sft_step on this process's share of step `step`'s global batch; the metrics (global) on the steps
    that log. tokens and tokens_per_s are those of the logging interval: its tokens over its training
    time (`meter` adds them up between metrics lines; evaluation and saves do not count)."""
    t0 = time.time()
    batch = data.batch(step, cfg)
    mine = local_micro_batches(batch, data.lengths, env.world_size * cfg.grad_accum, env.rank, env.world_size)
    micro_batches = [pad_batch([data.examples[i][0] for i in m], [data.examples[i][1] for i in m], data.pad_id,
                               env.device) for m in mine]
    n_targets = sum(data.targets[i] for i in batch)  # of the whole global batch: every process knows it
    nll_sum, grad_norm = sft_step(model, optimizer, micro_batches, n_targets, cfg, lr)
    tokens = sum(data.lengths[i] for m in mine for i in m)
    stats = all_reduce_sum(torch.tensor([nll_sum, tokens], dtype=torch.float64, device=env.device))
    meter["tokens"] += int(stats[1])
    meter["seconds"] += time.time() - t0
    if (step + 1) % cfg.log_every and step + 1 < data.total_steps:
        return None
    tokens, seconds = meter["tokens"], meter["seconds"]
    meter.update(tokens=0, seconds=0.0)
    return {"epoch": round(step / data.steps_per_epoch, 3), "loss": stats[0].item() / n_targets, "lr": lr,
            "grad_norm": grad_norm, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}


def eval_measure(cfg, env, data):
    """The held-out loss every eval_every steps and at the last one (a measure for trainer.train)."""
    def measure(model, done):
        due = done > 0 and ((cfg.eval_every and done % cfg.eval_every == 0) or done == data.total_steps)
        if not (due and data.eval_examples):
            return {}
        micro_size = cfg.batch_size // (env.world_size * cfg.grad_accum)
        return {"eval_loss": evaluate_loss(model, data.eval_examples, micro_size, data.pad_id, env.device, env.rank,
                                           env.world_size, is_sharded(model))}
    return measure


SHORT = {"loss": "loss", "lr": "lr", "tokens_per_s": "tokens_per_s", "eval_loss": "eval_loss"}  # the progress bar's


def run(cfg, env, made_by=None):
    """Build (or find) the student, train it on the chats, save the final checkpoint."""
    torch.manual_seed(cfg.seed)
    data = load_data(cfg, load_tokenizer(cfg.model), env)
    model = build_policy(cfg, env.device).train()
    shard(cfg, env, model)
    announce(cfg, env, model, "sft_config.json", made_by)
    meter = {"tokens": 0, "seconds": 0.0}
    step = lambda model, optimizer, index, lr, _: train_step(model, optimizer, index, lr, data, cfg, env, meter)  # noqa: E731
    done = train(cfg, model, step, data.total_steps, [eval_measure(cfg, env, data)], env, made_by, cfg.log_every,
                 SHORT, "sft")
    return finish(cfg, env, model, done, data.total_steps)


def main(argv=None):
    cfg, env = start(SFTConfig, argv, DEFAULT_CONFIG, "sft.py", __doc__)
    try:
        check_config(cfg, env.world_size)
        with hold_output_dir(cfg, env):
            prepare_student(cfg, env.rank)  # the demo student: built before its fingerprint is taken
            made_by = guard_output_dir(cfg, env, PATH_KEYS, {"data": cfg.data, "eval_data": cfg.eval_data},
                                       RESUME_MAY_CHANGE)
            return run(cfg, env, made_by)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli(main, "sft.py")
