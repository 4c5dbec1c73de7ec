"""
The training harness under sft.py and rl.py: everything a trainer needs that is neither SFT nor GRPO.

A trainer script declares its own keys, builds its data, and writes one step function

    step(model, optimizer, step, lr, generator) -> metrics dict   (None: nothing to log this step)

and a few measures, measure(model, done) -> dict (empty when not due); train() runs them from the saved
state to the last step. Nothing here is a callback, hook or registry: two functions are passed in,
and everything else is a plain call from the script.

Reads top to bottom: the keys every trainer shares (TrainingConfig); the start of a run (config,
processes, the output folder's guards); the policy and its reference; the data-parallel rule; the
optimiser and schedule; the loop; the final save.

The one data-parallel rule: each rank's loss is its share of the GLOBAL loss (the normaliser counts
every rank's tokens), so the gradient of the global loss is the SUM of the ranks' gradients:
sum_gradients all-reduces them (FSDP2 has summed them in backward already: distributed.shard_model). With
FSDP every forward and backward is a collective, so a rank with fewer micro-batches than another
runs padding ones (pad_micro_batches). A step that trains nothing on any rank does not call
optimizer_step: zero gradients would still move AdamW's weights by its momentum.
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from checkpoint import (check_output_dir, clear_finished_run, load_training_state, open_metrics, run_record,
                        save_training_state)
from common import (ConfigError, DEVICE, Progress, append_jsonl, check_fields, hold_output, load_config, load_tokenizer,
                    opt, save_config)
from distributed import (all_ranks, all_reduce_sum, barrier, full_state_dict, is_sharded, local_shard,
                         setup_distributed, shard_model, unwrap)
from model import LORA_TARGETS, AdaptersOff, add_lora, check_tokenizer_fits, load_model, save_adapter, save_model
from plots import draw_training_curves

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# -----------------------------------------------------------------------------
# The keys every trainer shares (each trainer adds its own; those whose help differs per trainer,
# such as model, data, batch_size or lora_rank, are declared by the trainer)


@dataclasses.dataclass
class TrainingConfig:
    lr: float = opt(1e-3, "peak learning rate", min=0)
    warmup_steps: int = opt(20, "linear warmup steps", min=0)
    min_lr_ratio: float = opt(0.1, "the cosine decays to lr * min_lr_ratio at the last step", min=0, max=1)
    weight_decay: float = opt(0.0, "AdamW weight decay (matrices only)", min=0)
    adam_beta1: float = opt(0.9, "AdamW beta1", min=0, lt=1)
    adam_beta2: float = opt(0.95, "AdamW beta2", min=0, lt=1)
    grad_clip: float = opt(1.0, "max global gradient norm; 0 = off", min=0)
    lora_alpha: float = opt(16.0, "LoRA alpha: the adapters add (alpha / r) * B A x", gt=0)
    lora_targets: list = opt(list(LORA_TARGETS), "the Linear layers of every block that get adapters",
                             choices=LORA_TARGETS, nonempty=True)
    lora_save_adapter: bool = opt(False, "also write the adapters alone to output_dir/adapter (PEFT's file format); "
                                  "output_dir itself always holds the merged checkpoint")
    dtype: str = opt("float32", "parameter dtype: bfloat16 keeps weights, grads and AdamW moments in bf16 (big models, "
                     "CUDA); with LoRA the base is in this dtype and the adapters float32", choices=tuple(DTYPES))
    device: str = opt("auto", "auto = cuda if available, else cpu", **DEVICE)
    gradient_checkpointing: bool = opt(False, "recompute each block's activations in backward: less memory, slower")
    resume: bool = opt(False, "continue from output_dir/train_state (made with the same settings)")
    force_resume: bool = opt(False, "resume even though settings or data changed (they are named)")
    overwrite: bool = opt(False, "replace the finished run in output_dir (its checkpoint, adapters, metrics and config "
                          "are removed first); without it such a folder is refused")

    WHERE = "config"  # how errors name the config ("sft config", "rl config")

    def __post_init__(self):
        check_fields(self, self.WHERE)
        if self.lora_rank and self.parallel == "fsdp":  # LoRA under fully_shard is not implemented (docs/fsdp.md)
            raise ConfigError(f"{self.WHERE}: lora_rank={self.lora_rank}, parallel=fsdp: expected parallel ddp with "
                              "LoRA (LoRA with FSDP is not supported; docs/fsdp.md)")


def default(key, value):
    """A shared key with this trainer's own default (the help text and limits stay TrainingConfig's)."""
    meta = dict(TrainingConfig.__dataclass_fields__[key].metadata)
    return opt(value, meta.pop("help"), **meta)


# Keys that may change on --resume in every trainer: they decide how a run is watched, saved, stopped
# or placed, not what it computes (a new device is not bit-exact, but moving a run is legitimate).
RESUME_MAY_CHANGE = ("resume", "force_resume", "overwrite", "stop_after_steps", "save_every", "eval_every", "device",
                     "gradient_checkpointing", "output_dir")

# -----------------------------------------------------------------------------
# The start of a run


@dataclasses.dataclass
class Env:
    """Where this process runs: its rank among world_size processes (torchrun), and its device."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def start(config_class, argv, default_config, prog, doc):
    """A trainer's start: its strict config (the first paragraph of `doc` heads --help), the process
    group under torchrun, the device. Returns (cfg, Env)."""
    cfg, positional = load_config(config_class, argv, default_config, prog, doc.strip().split("\n\n")[0])
    if positional:
        raise ConfigError(f"unexpected argument(s) {positional}; use --key value (see --help)")
    rank, world_size, _, device = setup_distributed()
    # The thread count set once, explicitly: torch.set_num_threads also turns MKL's dynamic threading off
    # (mkl_set_dynamic(false)). Left on, MKL may use fewer threads while the machine is loaded, and a
    # float32 backward then adds in another order (docs/results.md, "A pretrained student").
    torch.set_num_threads(torch.get_num_threads())
    if cfg.device != "auto" and world_size == 1:
        device = torch.device(cfg.device)
    return cfg, Env(rank, world_size, device)


@contextlib.contextmanager
def hold_output_dir(cfg, env):
    """Hold output_dir for this run alone, from its checks to its final save: rank 0 takes the OS lock
    (common.hold_output: a second run on the same folder is refused in one line; the kernel frees the
    lock when the run ends or is killed), and every rank learns whether it could, so a refused torchrun
    job stops on every rank instead of leaving the others waiting in a collective."""
    with contextlib.ExitStack() as stack:
        error = None
        if env.main:
            try:
                stack.enter_context(hold_output(os.path.abspath(cfg.output_dir).rstrip(os.sep)))
            except ValueError as e:
                error = e
        if not all_ranks(error is None, env.device) and error is None:
            raise ConfigError(f"{cfg.output_dir}: in use by another run (rank 0 could not hold it)")
        if error is not None:
            raise error
        yield


def guard_output_dir(cfg, env, path_keys, inputs, may_change):
    """What produced this run (checkpoint.run_record: the resolved config, the input files' sha256, the
    fingerprint of the checkpoint it starts from -- also RL's reference -- and the process layout),
    checked against output_dir before anything is written there: a --resume with other settings, inputs
    or weights is refused, and so is a fresh run into a folder holding another run's state, or a finished
    run unless --overwrite (which removes that run's files first). The one place that decides whether a
    run may use output_dir; call it inside hold_output_dir. Returns the record."""
    made_by = run_record(cfg, path_keys, inputs, {"model": cfg.model})
    made_by["layout"] = {"parallel": cfg.parallel, "world_size": env.world_size}
    check_output_dir(cfg, made_by, may_change, env.rank)
    if cfg.overwrite and not cfg.resume and env.main:
        clear_finished_run(cfg.output_dir)
    barrier()
    return made_by


def announce(cfg, env, model, config_name, made_by):
    """Rank 0: output_dir, the resolved config saved there (with the inputs' fingerprints) and printed,
    and what is trained where."""
    if not env.main:
        return
    os.makedirs(cfg.output_dir, exist_ok=True)
    save_config(cfg, cfg.output_dir, name=config_name, extra={"_inputs": (made_by or {}).get("inputs", {})})
    print("config: " + json.dumps(dataclasses.asdict(cfg), ensure_ascii=False), flush=True)
    print(f"model: {cfg.model} ({parameter_counts(model)}, {cfg.dtype}) on {env.device}, {env.world_size} "
          "process(es)", flush=True)


def parameter_counts(model):
    """"1.23M parameters" or, when some are frozen (LoRA), "1.23M parameters, 45.1k trained"."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{_count(total)} parameters" + (f", {_count(trained)} trained" if trained < total else "")


def _count(n):
    """12, 45.1k, 1.23M, 8.19B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return str(n)

# -----------------------------------------------------------------------------
# The policy and its reference


def build_policy(cfg, device):
    """The model to train: cfg.model in cfg.dtype; with lora_rank > 0 LoRA adapters on lora_targets (the
    base frozen: the optimizer and the training state see the adapters only); activation checkpointing."""
    model = load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=device)
    check_tokenizer_fits(load_tokenizer(cfg.model), model, cfg.model)  # before a prefill indexes past the embedding
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model


def build_reference(cfg, model, device):
    """The frozen starting checkpoint (a KL reference): with LoRA the policy itself with its adapters
    off (model.AdaptersOff: no second copy of the weights), else a frozen copy of cfg.model."""
    if cfg.lora_rank:
        return AdaptersOff(model)
    return load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=device).requires_grad_(False)


def shard(cfg, env, *models):
    """parallel: fsdp under torchrun: shard each model in place (FSDP2; before the optimizer, which holds
    the shards). Anything else: nothing."""
    if cfg.parallel == "fsdp" and env.world_size > 1:
        for model in models:
            if model is not None:
                shard_model(model, env.device)

# -----------------------------------------------------------------------------
# The data-parallel rule (see the module docstring)


def sum_gradients(params, sharded):
    """Each rank's loss is its share of the global loss: the global gradient is the sum of the ranks'.
    A parameter without a gradient on this rank gets zeros (the all-reduce needs every rank's part)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if not sharded:  # FSDP has summed them in backward (distributed.shard_model)
            all_reduce_sum(p.grad)


def pad_micro_batches(batches, padding, device):
    """`batches` + `padding` (a micro-batch whose loss is exactly 0) up to the largest number of
    micro-batches on any rank, so that every rank meets every collective of a sharded model."""
    n = torch.tensor([len(batches)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return batches + [padding] * (int(n) - len(batches))


def optimizer_step(model, optimizer, cfg, lr):
    """One update from the accumulated gradients: summed over ranks, clipped to cfg.grad_clip, AdamW at
    learning rate lr; the gradients are cleared. Returns the gradient norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]  # sharded: the shards, now that backward is done
    sum_gradients(params, is_sharded(model))
    grad_norm = clip_gradients(params, cfg.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def clip_gradients(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ for plain and sharded (DTensor) gradients: the global norm before
    clipping (a float; the norm of sharded gradients is summed over ranks), and the gradients scaled
    to at most max_norm (0 = off)."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total.item()


def autocast_for(device):
    """bf16 autocast on CUDA (fp32 master weights stay fp32); fp32 on CPU, where bf16 matmuls are slow."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()

# -----------------------------------------------------------------------------
# Optimiser and schedule


def lr_at(step, cfg, total_steps=None):
    """Learning rate at 0-based optimizer step: linear warmup to cfg.lr over warmup_steps, then cosine
    decay to cfg.lr * min_lr_ratio at the last step."""
    total = total_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - 1 - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def stochastic_round_to_bf16(x):
    """fp32 -> bf16, rounding up or down at random with probability proportional to the distance
    (unbiased: E[round(x)] = x). bf16 keeps the top 16 bits of an fp32; adding uniform noise to the
    16 dropped bits before truncating rounds up exactly with the probability of the dropped fraction."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bf16 parameters (big models on one GPU: no fp32 master copy). Moments are kept in bf16,
    the step is computed in fp32 and written back with stochastic rounding. Why: with round-to-nearest,
    an update smaller than half a bf16 step is lost (lr 1e-5 vs a step of ~1e-4 for a weight of 0.02),
    so the model would barely move; stochastic rounding is unbiased, so small updates add up."""

    CHUNK = 1 << 24  # elements per fp32 work chunk: bounds the temporaries of huge matrices (embeddings)

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                c1, c2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])  # sharded (FSDP2): this rank's shard
                for w, g, m, v in zip(*(local_shard(t).view(-1).split(self.CHUNK) for t in tensors)):
                    g32 = g.float()
                    m32 = m.float().lerp_(g32, 1 - b1)
                    v32 = v.float().mul_(b2).addcmul_(g32, g32, value=1 - b2)
                    m.copy_(m32)
                    v.copy_(v32)
                    w32 = w.float().mul_(1 - lr * wd).addcdiv_(m32 / c1, (v32 / c2).sqrt_().add_(eps), value=-lr)
                    w.copy_(stochastic_round_to_bf16(w32))


def build_optimizer(model, cfg):
    """AdamW (AdamWBF16 for bf16 parameters); weight decay only on matrices (not norm gains or biases)."""
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if params[0].dtype == torch.bfloat16:
        return AdamWBF16(groups, lr=cfg.lr, betas=betas)
    fused = params[0].is_cuda and not isinstance(params[0], DTensor)  # sharded: the foreach kernels
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)

# -----------------------------------------------------------------------------
# The loop


def step_seed(seed, step, rank):
    """A step's randomness is a pure function of (seed, step, rank): a resumed run samples what the
    uninterrupted one would have, and each rank samples differently."""
    return (seed * 1_000_003 + step * 9_973 + rank * 101) % (2 ** 63)


def train(cfg, model, step, total_steps, measures=(), env=Env(), made_by=None, log_every=1, short=None, name="train"):
    """Run step(model, optimizer, step, lr, generator) from the saved state (with cfg.resume) to
    total_steps; returns the number of steps done (fewer with cfg.stop_after_steps: left as if killed).

    Every rank runs every step and every measure(model, done) (a measure returns {} when it is not due,
    and may gather a sharded model; at a fresh start it is asked for step 0 too). Rank 0 appends
    {"step", the step's metrics, the measures} to output_dir/metrics.jsonl every log_every steps and
    at the last one, and whenever a measure reports. Every cfg.save_every steps the model, optimizer,
    step and RNG states go to output_dir/train_state atomically, with `made_by` (what produced the run).
    short {metric: name} picks what the progress bar shows."""
    optimizer, state_dir = build_optimizer(model, cfg), os.path.join(cfg.output_dir, "train_state")
    start, log = begin(cfg, model, optimizer, state_dir, measures, env, short)
    bar = Progress(total_steps, name, "step", initial=start, disable=not env.main)
    device = next(model.parameters()).device
    done = start
    for index in range(start, total_steps):
        if cfg.stop_after_steps and index - start >= cfg.stop_after_steps:
            break  # as if killed: no save
        generator = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, index, env.rank))
        metrics = step(model, optimizer, index, lr_at(index, cfg, total_steps), generator)
        done = index + 1
        logged = metrics if metrics and (done % log_every == 0 or done == total_steps) else {}
        record = {"step": done, **logged, **measure_all(measures, model, done)}
        if env.main and len(record) > 1:
            append_jsonl(log, record)
            bar.set_postfix_str(fmt_metrics(record, short))
        bar.update(1)
        if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:  # every rank: sharded, each its part
            save_training_state(state_dir, model, optimizer, done, {}, made_by)
            barrier()
    bar.close()
    if log is not None:
        log.close()
    return done


def begin(cfg, model, optimizer, state_dir, measures, env, short):
    """The first step: the saved one with cfg.resume (model and optimizer loaded from state_dir), else 0,
    and then the starting model's measures are logged. Returns (start, the metrics log: rank 0's, cut back
    to the start; None elsewhere)."""
    start, error = 0, None
    if cfg.resume:
        try:
            start = load_training_state(state_dir, model, optimizer)[0]
        except (ValueError, OSError) as e:  # a damaged file may be one rank's: every rank stops, none waits
            error = e
    if not all_ranks(error is None, env.device):
        raise error or ConfigError(f"{state_dir}: another rank could not load its part of the training state")
    log = None
    if env.main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        log = open_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), start)  # drops steps after the checkpoint
        if start:
            print(f"resumed from {state_dir} at step {start}", flush=True)
    if start == 0:
        record = {"step": 0, **measure_all(measures, model, 0)}
        if env.main and len(record) > 1:
            append_jsonl(log, record)
            print(f"step 0 (the starting model): {fmt_metrics(record, short)}", flush=True)
    return start, log


def measure_all(measures, model, done):
    out = {}
    for measure in measures:
        out.update(measure(model, done))
    return out


def fmt_metrics(record, short=None):
    """The one-line summary of a record for the progress bar: the metrics of `short` {key: name} (all
    numbers when None), 3 significant digits."""
    short = short or {k: k for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    return " ".join(f"{name}={record[k]:.3g}" if isinstance(record[k], float) else f"{name}={record[k]}"
                    for k, name in short.items() if k in record)

# -----------------------------------------------------------------------------
# The end of a run


def finish(cfg, env, model, done, total_steps, t0=None):
    """After train(): a run stopped early says how to resume it (returns None); a finished one saves the
    final HF checkpoint to output_dir (LoRA: merged into the base; lora_save_adapter: the adapters alone
    too), removes its resumable state (3x the model, dead weight now) and draws its training curves.
    Every rank calls it (a sharded model is gathered). Returns output_dir."""
    if done < total_steps:
        if env.main:
            print(f"stopped after step {done} of {total_steps} (stop_after_steps); resume with --resume", flush=True)
        return None
    weights = full_state_dict(model, env.rank) if is_sharded(model) else None  # every rank: shards all-gathered
    if env.main:
        save_model(unwrap(model), cfg.output_dir, tokenizer_dir=cfg.model, state=weights)
        adapter = os.path.join(cfg.output_dir, "adapter")
        if cfg.lora_rank and cfg.lora_save_adapter:
            save_adapter(unwrap(model), adapter, base_model=os.path.abspath(cfg.model))
        else:  # adapters of an earlier run in this folder would not belong to this checkpoint
            shutil.rmtree(adapter, ignore_errors=True)
        shutil.rmtree(os.path.join(cfg.output_dir, "train_state"), ignore_errors=True)
        took = f" after {time.time() - t0:.0f}s of training" if t0 else ""
        print(f"saved the final checkpoint to {cfg.output_dir}{took}; training curves: "
              f"{draw_training_curves(cfg.output_dir)}", flush=True)
    barrier()
    return cfg.output_dir

