"""
Stage 2 of Conf-Profile: confidence-guided GRPO on unlabelled users (docs/design.md, "Stage 2").

    python rl.py                                   # CPU demo: configs/rl_demo.json, from runs/demo/sft
    python rl.py --config configs/X.json [--key value ...] [--resume]
    torchrun --nproc_per_node=2 rl.py ...          # data-parallel: each rank its own users
    torchrun --nproc_per_node=2 rl.py --parallel fsdp   # and the model sharded (FSDP2): docs/fsdp.md

There are no labels. For each of B users the policy writes G profiles (one prompt, G rollouts). The
confidence-weighted vote of those G profiles is the truth ("quasi label"), each rollout is rewarded
for agreeing with it, and the policy is pushed towards the rollouts that agreed, GRPO-style.

What we keep from GRPO (TRL's GRPOTrainer option names): G samples per prompt and group-relative
advantages, no value network (`scale_rewards`); the clipped surrogate with clip-higher (`epsilon`,
`epsilon_high`) and `num_iterations` passes over one batch; the three token-loss normalisations
(`loss_type`: dapo, grpo, dr_grpo); k3 KL to a frozen reference (`beta`, default 0: no reference).
With LoRA (`lora_rank` > 0) only the adapters train, and the reference is the policy itself with its
adapters switched off (model.AdaptersOff): the starting checkpoint, without a second copy of it.

What Conf-Profile adds, each an option so it can be switched off:
  * quasi labels (`quasi_label`, `na_weight`): the Stage-1 vote over the G rollouts; NA's votes may
    be discounted (NA is "too little evidence", not evidence for a class).
  * difficulty filter (`difficulty`, `low`, `high`): train on users whose rollouts agree moderately;
    rollouts without a valid answer count against agreement.
  * reward r_j = fmt_j + (1/|D|) sum_d w_jd * s_jd: agreeing with the quasi label earns, disagreeing
    costs its stated confidence (`agreement`), an unparseable answer costs -1, and a dimension
    answered without a confidence is a failure of that dimension, never a cheaper answer.
  * frozen confidence (`confidence_weighting`): the tokens that state a confidence, exactly as the
    parser reads them, are cut out of the loss, so RL cannot inflate the number it is weighted by.
  * credit per dimension (`advantage`): each dimension's reward has its own group-relative advantage,
    given to the tokens of that dimension's answer.

What we drop: value and reward models, entropy bonuses, vLLM / TRL machinery. Rollouts share each
prompt's KV cache (rollout.generate); training shares it too (pack_groups): one row [prompt, c1..cG].
A step is five phases: rollouts (sample_groups) -> scores (score_profiles) -> advantages
(training_batch) -> policy update (policy_update) -> metrics (step_metrics), one line per step in
output_dir/metrics.jsonl, drawn at the end in output_dir/training_curves.png (reward, agreement, NA
rate, mean stated confidence: plots.py).
"""
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch

from common import (DEVICE, PARALLEL, ConfigError, DataError, Progress, all_reduce_sum, append_jsonl,
                    autocast_for, barrier, build_optimizer, chat_prompt_ids, check_fields, check_output_dir,
                    cleanup_distributed, clip_gradients, completion_text, full_parameters, full_state_dict,
                    is_sharded, iter_jsonl, load_tokenizer, load_training_state, lr_at, open_metrics, opt, run_record,
                    save_config, save_training_state, setup_run, shard_model, stop_ids_for)
from confprofile import (DEFAULT_TAXONOMY, load_taxonomy, parse_answer, parse_answer_spans, read_users, render_prompt,
                         vote)
from evaluate import evaluate, profile_from_parse
from model import LORA_TARGETS, AdaptersOff, add_lora, load_model, save_adapter, save_model
from plots import draw_training_curves
from rollout import SamplingParams, generate, token_logprobs

# -----------------------------------------------------------------------------
# Config

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "rl_demo.json")
CHOICES = {
    "quasi_label": ("confidence", "majority"),
    "difficulty": ("rollout", "stage1", "off"),
    "confidence_weighting": ("rollout_masked", "stage1", "live", "off"),
    "agreement": ("weighted", "flat"),
    "scale_rewards": ("group", "none"),
    "advantage": ("dimension", "sequence"),
    "loss_type": ("dapo", "grpo", "dr_grpo"),
    "dtype": ("float32", "bfloat16"),
}


@dataclass
class RLConfig:
    # model and data
    model: str = opt("runs/demo/sft", "HF checkpoint dir of the SFT student (also the KL reference)", nonempty=True)
    data: str = opt("runs/demo/world/train.jsonl", "unlabelled users (JSONL)", nonempty=True)
    stage1: str = opt("runs/demo/sft.jsonl", "calibrate.py's SFT set: the frozen Stage-1 confidences that "
                      "difficulty=stage1 and confidence_weighting=stage1 read")
    taxonomy: str = opt("", "taxonomy JSON (empty: taxonomy.json of the repository)")
    output_dir: str = opt("runs/demo/rl", "the final HF checkpoint, rl_config.json, metrics.jsonl, train_state/",
                          nonempty=True)
    chat_template_kwargs: dict = opt({}, 'passed to the chat template, e.g. {"enable_thinking": false} for Qwen3')
    # rollouts
    batch_size: int = opt(4, "B: users per step, all processes together", min=1)
    num_generations: int = opt(8, "G: rollouts per user (advantages are relative within these)", min=2)
    max_new_tokens: int = opt(256, "longest rollout (TRL: max_completion_length)", min=1)
    temperature: float = opt(1.0, "sampling temperature, also of the ratio's logprobs", gt=0)
    top_k: int = opt(0, "sample from the k most likely tokens (0 = all)", min=0)
    top_p: float = opt(1.0, "nucleus mass to sample from (1 = all)", gt=0, max=1)
    max_batch_tokens: int = opt(0, "KV-cache slots per generate() batch (0 = the device's default)", min=0)
    # Conf-Profile
    quasi_label: str = opt("confidence", "quasi label: the vote of the G rollouts weighted by stated confidence, or "
                           "a plain majority", choices=CHOICES["quasi_label"])
    na_weight: float = opt(1.0, "weight of the NA votes in the quasi-label vote (1 = as in Stage 1; below 1 a label "
                           "the rollouts agree on outvotes a few hesitant NAs)", min=0)
    difficulty: str = opt("rollout", "difficulty of a user: the rollouts' agreement and confidence, the frozen "
                          "Stage-1 confidence, or off (keep everyone)", choices=CHOICES["difficulty"])
    low: float = opt(0.0, "keep users whose difficulty is >= low (below: quasi label too scattered to trust)",
                     min=0, max=10)
    high: float = opt(10.0, "keep users whose difficulty is <= high (above: the rollouts already agree)", min=0, max=10)
    confidence_weighting: str = opt("rollout_masked", "w of the reward: the rollout's stated confidence with its "
                                    "tokens frozen, the Stage-1 confidence, its live (trained) confidence, or 1",
                                    choices=CHOICES["confidence_weighting"])
    agreement: str = opt("flat", "an agreeing answer earns +1 (flat) or +w (weighted); a disagreeing one costs w",
                         choices=CHOICES["agreement"])
    # GRPO
    scale_rewards: str = opt("group", "divide advantages by the group's reward std (group) or not (none)",
                             choices=CHOICES["scale_rewards"])
    advantage: str = opt("dimension", "one advantage per dimension, given to its answer's tokens, or one per "
                         "rollout (sequence: plain GRPO)", choices=CHOICES["advantage"])
    loss_type: str = opt("dapo", "token-loss normalisation: dapo (batch token mean), grpo (per sequence), dr_grpo "
                         "(constant)", choices=CHOICES["loss_type"])
    epsilon: float = opt(0.2, "lower clip of the ratio: 1 - epsilon", min=0, lt=1)
    epsilon_high: float = opt(0.28, "upper clip of the ratio: 1 + epsilon_high (clip-higher)", min=0)
    beta: float = opt(0.0, "weight of the k3 KL to the starting checkpoint (0: no reference model is loaded)", min=0)
    num_iterations: int = opt(1, "optimizer steps on each batch of rollouts", min=1)
    micro_batch_size: int = opt(8, "rollouts per forward/backward (gradients accumulate over the batch)", min=1)
    # optimisation
    max_steps: int = opt(20, "GRPO steps", min=1)
    lr: float = opt(1e-5, "peak learning rate", min=0)
    min_lr_ratio: float = opt(0.1, "the cosine decays to lr * min_lr_ratio at the last step", min=0, max=1)
    warmup_steps: int = opt(0, "linear warmup steps", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay (matrices only)", min=0)
    adam_beta1: float = opt(0.9, "AdamW beta1", min=0, lt=1)
    adam_beta2: float = opt(0.99, "AdamW beta2", min=0, lt=1)
    grad_clip: float = opt(1.0, "max global gradient norm; 0 = off", min=0)
    gradient_checkpointing: bool = opt(False, "recompute each block's activations in backward: less memory, slower")
    dtype: str = opt("float32", "parameter dtype: bfloat16 keeps weights, grads and AdamW moments in bf16 (big models, "
                     "CUDA); with LoRA the base is in this dtype and the adapters float32", choices=CHOICES["dtype"])
    # LoRA
    lora_rank: int = opt(0, "LoRA rank r: train low-rank adapters on lora_targets, the base frozen (and, with beta > 0, "
                         "the KL reference: no second copy of the weights); 0 = full fine-tuning", min=0)
    lora_alpha: float = opt(16.0, "LoRA alpha: the adapters add (alpha / r) * B A x", gt=0)
    lora_dropout: float = opt(0.0, "dropout on the adapters' input in training (> 0: the trainer's logprobs are no "
                              "longer the sampler's)", min=0, lt=1)
    lora_targets: list = opt(list(LORA_TARGETS), "the Linear layers of every block that get adapters",
                             choices=LORA_TARGETS, nonempty=True)
    lora_save_adapter: bool = opt(False, "also write the adapters alone to output_dir/adapter (PEFT's file format); "
                                  "output_dir itself always holds the merged checkpoint")
    device: str = opt("auto", "auto = cuda if available, else cpu", **DEVICE)
    parallel: str = opt("ddp", "under torchrun: ddp (each process a full copy, gradients all-reduced) or fsdp "
                        "(FSDP2: parameters, gradients, AdamW moments and the KL reference sharded over the "
                        "processes)", choices=PARALLEL)
    seed: int = opt(0, "data order and rollout randomness", min=0)
    # evaluation, logging, checkpoints
    dev_data: str = opt("", "labelled users for a periodic greedy evaluation (empty: none)")
    dev_size: int = opt(100, "dev users evaluated", min=1)
    eval_every: int = opt(0, "steps between dev evaluations (0 = none)", min=0)
    eval_max_new_tokens: int = opt(0, "greedy answer length of the dev evaluation and the probe (0 = max_new_tokens)",
                                   min=0)
    probe_size: int = opt(32, "training users whose greedy answers are compared with the SFT student's (0 = no probe)",
                          min=0)
    probe_every: int = opt(10, "steps between probes (and at the last step)", min=0)
    save_every: int = opt(0, "steps between resumable checkpoints (0 = only the final model)", min=0)
    resume: bool = opt(False, "continue from output_dir/train_state (made with the same settings)")
    force_resume: bool = opt(False, "resume even though settings or data changed (they are named)")
    stop_after_steps: int = opt(0, "leave after this many steps without saving, as if killed (the resume test)", min=0)

    def __post_init__(self):
        check_fields(self, "rl config")
        if self.lora_rank and self.parallel == "fsdp":  # LoRA under fully_shard is not implemented (docs/fsdp.md)
            raise ConfigError(f"rl config: lora_rank={self.lora_rank}, parallel=fsdp: expected parallel ddp with LoRA "
                              "(LoRA with FSDP is not supported; docs/fsdp.md)")
        if self.low > self.high:
            raise ConfigError(f"rl config: low={self.low}, high={self.high}; expected low <= high")

    @property
    def mask_confidence(self):
        """Frozen confidence: every weighting mode but the `live` ablation cuts the confidence tokens out."""
        return self.confidence_weighting != "live"


# Keys that may change on --resume (common.check_output_dir): evaluation, saving, stopping and placement only.
RESUME_MAY_CHANGE = ("resume", "force_resume", "stop_after_steps", "save_every", "eval_every", "dev_data", "dev_size",
                     "eval_max_new_tokens", "probe_size", "probe_every", "device", "gradient_checkpointing", "output_dir")
PATH_KEYS = ("model", "data", "stage1", "taxonomy", "output_dir", "dev_data")  # compared as absolute paths


# -----------------------------------------------------------------------------
# Stage 2 formulas: pure functions (tests/test_rl.py checks each with hand-computed numbers)


def stated_answers(parsed):
    """A rollout's answers as Stage 2 reads them: a dimension without a stated confidence (the
    labels-only form {"gender": "female"}, which parse_answer accepts) is invalid, exactly like an
    unparseable one. Otherwise omitting the confidence would make a wrong label cheaper (-0.1 at the
    labels-only weight of 1 instead of -c/10) and RL could learn to drop its confidences."""
    dims = {d: (None if a is None or a["confidence"] is None else a) for d, a in parsed["dims"].items()}
    return {**parsed, "dims": dims}


def quasi_labels(parsed, taxonomy, weighting="confidence", na_weight=1.0):
    """Stage 2 quasi ground truth: the Stage-1 vote over one user's G rollouts.

    S_k = sum_j c_j * 1[y_j = k] (weighting="confidence") or sum_j 1[y_j = k] ("majority"); the quasi
    label is argmax_k S_k with pooled confidence (S_y / sum_k S_k) * mean{c_j : y_j = y}. Only
    rollouts that parse take part, and of those only the dimensions with a stated confidence
    (stated_answers). na_weight < 1 discounts the votes for NA (confprofile.vote_scores).
    Returns confprofile.vote's {dim: {"label", "pooled_confidence", "n_valid", ...} | None}.
    """
    valid = [stated_answers(p) for p in parsed if p["format_ok"]]
    if not valid:
        return {d: None for d in taxonomy["dimensions"]}
    return vote(valid, taxonomy, weighting=weighting, na_weight=na_weight)


def difficulty(quasi, n_rollouts, stage1_confidence=None):
    """Stage 2 difficulty of a user, on the 0..10 confidence scale:

        difficulty = (1/|D|) sum_d r_d * n_d / G

    r_d the pooled confidence of dimension d's quasi label, n_d the number of the G = n_rollouts
    rollouts that gave a valid answer for d (so failures count against agreement: 1 valid rollout of 8
    at confidence 8 is 8 * 1/8 = 1, hard, not easy); a dimension without a quasi label counts 0.
    Given `stage1_confidence` {dim: int}, the mean frozen Stage-1 calibrated confidence instead."""
    if stage1_confidence is not None:
        return sum(stage1_confidence.values()) / len(stage1_confidence)
    values = [0.0 if q is None else q["pooled_confidence"] * q["n_valid"] / n_rollouts for q in quasi.values()]
    return sum(values) / len(values)


def difficulty_mask(values, low, high):
    """Stage 2 difficulty filter: keep a user iff low <= difficulty <= high.

    Above `high` the rollouts already agree confidently (little to learn: too easy); below `low` the
    quasi label is too scattered to trust (too hard). `None` (filter off) keeps the user.
    Returns (keep: list[bool], counts {"kept", "too_easy", "too_hard"}).
    """
    keep, counts = [], {"kept": 0, "too_easy": 0, "too_hard": 0}
    for v in values:
        reason = "kept" if v is None or low <= v <= high else ("too_easy" if v > high else "too_hard")
        counts[reason] += 1
        keep.append(reason == "kept")
    return keep, counts


def rollout_reward(parsed, quasi, weighting, stage1_confidence=None, agreement="flat"):
    """Stage 2 reward of one rollout: r_j = fmt_j + (1/|D|) sum_d w_jd * s_jd  (= the mean of
    dimension_rewards; see there for w, s and the `agreement` option).

    fmt_j = -1 if the answer does not parse (and then no agreement terms), else 0. |D| is the
    number of dimensions of the taxonomy (the keys of `quasi`).
    """
    if not parsed["format_ok"]:
        return -1.0
    return sum(dimension_rewards(parsed, quasi, weighting, stage1_confidence, agreement)) / len(quasi)


def dimension_rewards(parsed, quasi, weighting, stage1_confidence=None, agreement="flat"):
    """The reward of one rollout split by dimension, r_jd = fmt_j + w_jd * s_jd, so that
    r_j = (1/|D|) sum_d r_jd. Returns [r_jd for d in quasi] (taxonomy order).

    s_jd = +1 if the rollout's label for d equals the quasi label, else -1. w_jd by `weighting`:
      rollout_masked, live: the rollout's own stated confidence c_jd / 10
      stage1: the frozen Stage-1 calibrated confidence of (user, d) / 10
      off: 1
    agreement="flat": an agreeing answer earns +1 whatever its w (only disagreeing ones are weighted:
    a confident wrong answer costs more than a hesitant one), so rollouts that all agree get equal
    rewards and no advantage. agreement="weighted": +w_jd too, so agreeing rollouts are ranked by
    their own stated confidence (the formula as first written; see the module docstring).
    An unparseable answer gets -1 on every dimension; a dimension it left invalid, or answered
    without a stated confidence (stated_answers), -1 (a wrong answer at full weight: omitting is never
    a way out); a dimension with no quasi label (no rollout answered it) 0.
    """
    if not parsed["format_ok"]:
        return [-1.0] * len(quasi)
    dims = stated_answers(parsed)["dims"]
    out = []
    for d, q in quasi.items():
        answer = dims.get(d)
        if q is None:
            out.append(0.0)
        elif answer is None:
            out.append(-1.0)
        elif answer["label"] == q["label"] and agreement == "flat":
            out.append(1.0)
        else:
            s = 1.0 if answer["label"] == q["label"] else -1.0
            if weighting in ("rollout_masked", "live"):
                w = answer["confidence"] / 10
            elif weighting == "stage1":
                w = stage1_confidence[d] / 10
            else:
                w = 1.0
            out.append(w * s)
    return out


def token_advantages(dim_advantages, seq_advantage, token_dims):
    """Per-token advantages of one rollout: a token inside dimension d's answer gets A_jd (the
    group-relative advantage of r_jd), a token outside every dimension's answer (braces between
    answers, a <think> block, the end-of-turn token) the advantage of the whole reward.
    dim_advantages [D], token_dims [T] ints (-1 = outside)."""
    return [seq_advantage if d < 0 else dim_advantages[d] for d in token_dims]


FLAT_TOLERANCE = 1e-9  # rewards of one group this close together are equal (float sums of c/10 terms)


def flat_groups(rewards, tol=FLAT_TOLERANCE):
    """Groups whose rewards are all equal: max_G r - min_G r <= tol. rewards [B, G] (or [B, G, D])
    -> bool [B, 1] (or [B, 1, D])."""
    return (rewards.amax(dim=1, keepdim=True) - rewards.amin(dim=1, keepdim=True)) <= tol


def group_advantages(rewards, scale_rewards="group", eps=1e-4):
    """GRPO group-relative advantages: A_j = (r_j - mean_G r) / (std_G r + eps), rewards [B, G]
    (or [B, G, D]: each dimension normalised over its own group).

    std is the unbiased (n - 1) standard deviation, as in TRL. A group whose rewards are all equal
    (flat_groups) gets exactly A = 0: it carries no signal (computed in float64, and the mean of
    eight rewards of 0.8 is not exactly 0.8 in float32). scale_rewards="none" keeps A_j = r_j - mean_G r.
    """
    r = rewards.double()
    centred = (r - r.mean(dim=1, keepdim=True)).masked_fill(flat_groups(r), 0.0)
    if scale_rewards != "none":
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.float()


def clipped_surrogate(logp, old_logp, advantages, epsilon, epsilon_high):
    """PPO/GRPO clipped surrogate per token: -min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A),
    rho = exp(logp - old_logp). logp, old_logp [N, T]; advantages [N] (one per sequence) or [N, T]
    (one per token). Returns (loss [N, T], rho)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages if advantages.dim() == 2 else advantages[:, None]
    loss = -torch.minimum(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon_high) * a)
    return loss, ratio


def k3_kl(logp, ref_logp):
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def loss_normaliser(n_sequences, n_loss_tokens, loss_type, max_new_tokens):
    """Denominator of the batch loss for `loss_type`, counted over the WHOLE batch (all micro-batches,
    all ranks): dapo = loss tokens; grpo = sequences (each sequence's token mean is taken first, see
    loss_numerator); dr_grpo = sequences * max_new_tokens (a constant: no length bias at all)."""
    return float({"dapo": n_loss_tokens, "grpo": n_sequences, "dr_grpo": n_sequences * max_new_tokens}[loss_type])


def loss_numerator(per_token, mask, loss_type):
    """This micro-batch's share of the batch loss numerator: sum of masked token losses
    (dapo, dr_grpo) or sum over sequences of their masked per-token mean (grpo)."""
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    return masked.sum()


def grpo_loss(logp, old_logp, advantages, mask, loss_type, epsilon, epsilon_high, beta=0.0,
              ref_logp=None, max_new_tokens=None, normaliser=None):
    """The GRPO objective for one (micro-)batch: clipped surrogate + beta * k3 KL, normalised by
    `loss_type`. Pass the whole batch's `normaliser` (loss_normaliser) when this is one micro-batch
    of several, so that the accumulated gradients equal those of the whole batch at once.
    mask [N, T] is 1 on the tokens that take part (completion tokens minus confidence tokens)."""
    mask = mask.to(logp.dtype)
    per_token, ratio = clipped_surrogate(logp, old_logp, advantages, epsilon, epsilon_high)
    if beta > 0:
        per_token = per_token + beta * k3_kl(logp, ref_logp)
    if normaliser is None:
        normaliser = loss_normaliser(mask.shape[0], mask.sum().item(), loss_type, max_new_tokens or mask.shape[1])
    return loss_numerator(per_token, mask, loss_type) / normaliser


def clip_fractions(ratio, advantages, mask, epsilon, epsilon_high):
    """Fractions of loss tokens where the clip is active (TRL's clip_ratio/low, /high, /region):
    low = rho < 1 - eps with A < 0, high = rho > 1 + eps_high with A > 0, region = either."""
    mask = mask.bool()
    a = (advantages if advantages.dim() == 2 else advantages[:, None]).expand_as(ratio)
    low = (ratio < 1 - epsilon) & (a < 0) & mask
    high = (ratio > 1 + epsilon_high) & (a > 0) & mask
    n = mask.sum().clamp(min=1)
    return {"clip_low": (low.sum() / n).item(), "clip_high": (high.sum() / n).item(),
            "clip_region": ((low | high).sum() / n).item()}


def token_entropy(logits, temperature):
    """Entropy of the sampling distribution per position: -sum_v p_v log p_v, p = softmax(logits / T)."""
    logp = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# -----------------------------------------------------------------------------
# Token maps: which completion tokens spell a stated confidence, which belong to which dimension.
# Both come from confprofile.parse_answer_spans, the parser that reads the reward's inputs, so every
# confidence the reward reads is a masked one, whatever the key's spelling.


def completion_char_ends(tokenizer, tokens, stop_ids):
    """(text, ends): the completion's text as the reward reads it (common.completion_text: the final
    stop token dropped, special tokens skipped) and, per token, the end offset of its characters in
    that text (start = the previous token's end; a special token is zero-width, the stop token sits at
    the end).

    Fast path: decode the tokens one by one and keep the pieces if they join up to the text (the
    usual case). Otherwise (a character split over tokens, e.g. Chinese in byte-level BPE) decode
    growing prefixes, len(decode(ids[:i+1])), then take the running minimum from the right, so an
    incomplete character's replacement glyphs never push later offsets past the text."""
    ids = list(tokens)
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
    if "".join(pieces) == text:
        ends, n = [], 0
        for p in pieces:
            n += len(p)
            ends.append(n)
    else:
        ends = [len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]
        for i in range(len(ends) - 1, -1, -1):
            ends[i] = min(ends[i], ends[i + 1] if i + 1 < len(ends) else len(text))
    return text, ends + [len(text)] * (len(tokens) - len(ids))


def confidence_token_mask(ends, spans):
    """Frozen confidence: True on each token that overlaps a stated confidence (the `8` of
    `"confidence": 8`, all of `"8/10"`), the tokens `rollout_masked` cuts out of the loss. ends:
    completion_char_ends; spans: parse_answer_spans' spans of the same text. A token holding a
    digit together with other characters (' 8,') is masked whole: masking a little more than the
    number is safe, missing part of it is not."""
    conf = [s for d in spans.values() for s in d["confidence"]]
    mask, start = [], 0
    for end in ends:
        mask.append(any(start < b and end > a for a, b in conf))
        start = end
    return mask


def dimension_token_index(ends, spans, taxonomy):
    """For each token, the index (taxonomy order) of the dimension whose answer it lies in, or -1.

    A dimension's answer is the span the parser read for it: from its key's opening quote to the end
    of its value (parse_answer_spans). A token belongs to dimension d iff all of its characters lie
    inside d's answer (a zero-width token: strictly inside). Tokens that straddle two answers or an
    answer's edge (Qwen's '}, "' or the closing '}}'), and tokens outside every answer (the opening
    brace, a <think> block, the end-of-turn token) get -1: the advantage of the whole rollout."""
    order = {d: i for i, d in enumerate(taxonomy["dimensions"])}
    bounds = [(s["answer"], order[d]) for d, s in spans.items()]
    out, start = [], 0
    for end in ends:
        inside = [k for (a, b), k in bounds if (a <= start and end <= b if end > start else a < start < b)]
        out.append(inside[0] if inside else -1)
        start = end
    return out


# -----------------------------------------------------------------------------
# Scoring one step's rollouts for Conf-Profile (parse -> quasi labels -> filter -> rewards -> token masks)


@dataclass
class Scored:
    """What the trainer needs from a task: rewards [B, G], which users to train on, and per rollout
    the 0/1 loss mask over its completion tokens. `stats` are sums/counts logged as metrics.
    For per-dimension advantages also the rewards split by dimension [B, G, D] (their mean over D
    is `rewards`) and per rollout each token's dimension (-1 = none)."""
    rewards: torch.Tensor
    keep: list
    token_masks: list                 # [B][G] -> list[int], 1 = the token takes part in the loss
    stats: dict = field(default_factory=dict)
    dim_rewards: torch.Tensor = None  # [B, G, D]
    token_dims: list = None           # [B][G] -> list[int]


def score_profiles(groups, users, taxonomy, tokenizer, cfg, stage1=None):
    """Conf-Profile scoring of B users' G rollouts each (groups[i][j] = rollout.Sample): parse ->
    quasi labels -> difficulty -> rewards, and the two token maps, from one parse of one text."""
    stop_ids = set(stop_ids_for(tokenizer))
    dims = list(taxonomy["dimensions"])
    keep_values, token_masks, dim_rewards, token_dims = [], [], [], []
    stats = dict.fromkeys(["format_fail", "dim_slots", "conf_sum", "answered", "na", "no_confidence", "majority_sum",
                           "majority_n", "difficulty_sum"], 0.0)
    for samples, user in zip(groups, users):
        token_ends, parsed, spans = [], [], []
        for s in samples:
            text, ends = completion_char_ends(tokenizer, s.tokens, stop_ids)
            p, sp = parse_answer_spans(text, taxonomy)
            token_ends.append(ends)
            parsed.append(p)
            spans.append(sp)
        quasi = quasi_labels(parsed, taxonomy, cfg.quasi_label, cfg.na_weight)
        frozen = stage1[user["user_id"]] if stage1 is not None else None
        level = difficulty(quasi, len(samples), frozen if cfg.difficulty == "stage1" else None)
        keep_values.append(None if cfg.difficulty == "off" else level)
        dim_rewards.append([dimension_rewards(p, quasi, cfg.confidence_weighting, frozen, cfg.agreement)
                            for p in parsed])
        token_masks.append([[0 if c else 1 for c in confidence_token_mask(ends, sp)] if cfg.mask_confidence
                            else [1] * len(ends) for ends, sp in zip(token_ends, spans)])
        token_dims.append([dimension_token_index(ends, sp, taxonomy) for ends, sp in zip(token_ends, spans)])
        for p in parsed:
            stats["format_fail"] += not p["format_ok"]
            stats["dim_slots"] += len(dims)
            for d, answer in p["dims"].items():
                if answer is None:
                    continue
                stats["no_confidence"] += answer["confidence"] is None
                if answer["confidence"] is not None:
                    stats["answered"] += 1
                    stats["conf_sum"] += answer["confidence"]
                    stats["na"] += answer["label"] == "NA"
        for d in dims:  # majority ratio: the share of all G rollouts that gave the quasi label
            if quasi[d] is not None:
                agreeing = sum(1 for p in parsed if p["format_ok"] and (stated_answers(p)["dims"][d] or {}).get("label")
                               == quasi[d]["label"])
                stats["majority_sum"] += agreeing / len(samples)
                stats["majority_n"] += 1
        stats["difficulty_sum"] += level
    keep, counts = difficulty_mask(keep_values, cfg.low, cfg.high)
    stats.update(counts)
    dim_rewards = torch.tensor(dim_rewards, dtype=torch.float64)  # [B, G, D]
    rewards = dim_rewards.mean(dim=-1)  # r_j = (1/|D|) sum_d r_jd: rollout_reward, from the same terms
    return Scored(rewards, keep, token_masks, stats, dim_rewards, token_dims if cfg.advantage == "dimension" else None)


# -----------------------------------------------------------------------------
# The trainer's side of the ratio: logprobs of the rollouts under the current policy, prompt shared


def pack_groups(packs):
    """Lay out [(prompt, [completion, ...]), ...] as rows [prompt, c1, c2, ...] (right-padded), so the
    prompt is run once per row instead of once per completion: the training-side twin of the
    sampler's prefix sharing (a 440-token prompt with 6 completions of 150: 1,340 tokens, not 3,540).

    Completion j of a row sits at positions P, P+1, ... (P = prompt length), exactly where it sat
    when sampled, and attends to the prompt and to itself only (segment mask). Returns ids [R, T],
    positions [R, T], mask [R, 1, T, T] (True = may attend), and per completion n (in order):
    row [N], index [N, C] (where the state that predicts its token k is: P - 1 for k = 0, else the
    previous token) and targets [N, C] (C = longest completion; pads point at a real state and are
    masked out of the loss by the caller)."""
    width = max(len(p) + sum(len(c) for c in cs) for p, cs in packs)
    n_comp = sum(len(cs) for _, cs in packs)
    c_max = max(len(c) for _, cs in packs for c in cs)
    ids = torch.zeros(len(packs), width, dtype=torch.long)
    positions = torch.zeros(len(packs), width, dtype=torch.long)
    segment = torch.full((len(packs), width), -1, dtype=torch.long)  # 0 = prompt, j + 1 = completion j, -1 = pad
    row = torch.zeros(n_comp, dtype=torch.long)
    index = torch.zeros(n_comp, c_max, dtype=torch.long)
    targets = torch.zeros(n_comp, c_max, dtype=torch.long)
    n = 0
    for r, (prompt, completions) in enumerate(packs):
        P = len(prompt)
        ids[r, :P], positions[r, :P], segment[r, :P] = torch.tensor(prompt), torch.arange(P), 0
        offset = P
        for j, c in enumerate(completions):
            L = len(c)
            ids[r, offset:offset + L] = torch.tensor(c)
            positions[r, offset:offset + L] = P + torch.arange(L)
            segment[r, offset:offset + L] = j + 1
            row[n] = r
            index[n] = P - 1
            index[n, 1:L] = torch.arange(offset, offset + L - 1)
            targets[n, :L] = torch.tensor(c)
            n, offset = n + 1, offset + L
    i = torch.arange(width)
    causal = i[None, :] <= i[:, None]                                            # [T, T]
    same = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # key is prompt or own segment
    mask = (causal & same) | torch.eye(width, dtype=torch.bool)                  # a pad query sees itself: no NaN
    return ids, positions, mask[:, None], row, index, targets


def completion_logprobs(model, packs, temperature):
    """Teacher-forced logprobs of every completion in `packs` (see pack_groups) under `model`: one
    forward of the packed rows with their segment mask, the vocabulary projection only at the states
    that predict completion tokens (never the prompt's: less time and memory with a big vocabulary).
    Returns (logp [N, C] from rollout.token_logprobs at `temperature`, entropy [N, C] without gradient)."""
    device = next(model.parameters()).device
    ids, positions, mask, row, index, targets = (t.to(device) for t in pack_groups(packs))
    logits = model(ids, positions, mask=mask, logits_at=(row[:, None], index))   # [N, C, V]
    logp = token_logprobs(logits, targets, temperature)
    with torch.no_grad():
        entropy = token_entropy(logits, temperature)
    return logp, entropy


def micro_batches(groups, limit):
    """Cut groups [(prompt, [rollout rows])] into micro-batches of at most `limit` rollouts; a group
    larger than that is split (each part takes its own copy of the prompt). A micro-batch is a list
    of (prompt, rows) packs."""
    parts = [(p, rows[k:k + limit]) for p, rows in groups for k in range(0, len(rows), limit)]
    batches, current, size = [], [], 0
    for p, rows in parts:
        if current and size + len(rows) > limit:
            batches.append(current)
            current, size = [], 0
        current.append((p, rows))
        size += len(rows)
    return batches + ([current] if current else [])


def padded(rows, width, dtype=torch.float32):
    """Ragged per-token lists -> a [len(rows), width] tensor, zero after each row's end (= not in the loss)."""
    out = torch.zeros(len(rows), width, dtype=dtype)
    for r, row in enumerate(rows):
        out[r, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


# -----------------------------------------------------------------------------
# One GRPO step, in phases: rollouts -> scores -> advantages -> policy update -> metrics


def sample_groups(model, prompts, cfg, generator, stop_ids):
    """Rollouts: G samples of each of this rank's prompts from the current policy."""
    model.eval()
    sampling = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, tuple(stop_ids),
                              cfg.max_batch_tokens)
    return generate(model, prompts, sampling, n=cfg.num_generations, generator=generator)


def training_batch(groups, prompts, scored, cfg):
    """Advantages -> the training batch: [(prompt, rows)] for every kept user, a row per rollout with
    its tokens, sampler logprobs, loss mask and one advantage per token. A row is `trained` unless its
    advantages are all exactly 0 and beta = 0: then its loss and gradient are exactly 0, so only a
    no-grad forward is run for it (its tokens still count in the loss normaliser and the metrics)."""
    advantages = group_advantages(scored.rewards, cfg.scale_rewards)                   # [B, G]
    per_dimension = cfg.advantage == "dimension" and scored.token_dims is not None
    if per_dimension:
        dim_advantages = group_advantages(scored.dim_rewards, cfg.scale_rewards)       # [B, G, D]
    batch = []
    for i, samples in enumerate(groups):
        if not scored.keep[i]:
            continue
        rows = []
        for j, s in enumerate(samples):
            adv = (token_advantages(dim_advantages[i, j].tolist(), float(advantages[i, j]), scored.token_dims[i][j])
                   if per_dimension else [float(advantages[i, j])] * len(s.tokens))
            rows.append({"tokens": s.tokens, "sampler_logp": s.logprobs, "mask": scored.token_masks[i][j], "adv": adv,
                         "trained": cfg.beta > 0 or any(a != 0.0 for a in adv)})
        batch.append((prompts[i], rows))
    return batch, advantages


def policy_update(model, ref_model, optimizer, batch, cfg, lr):
    """num_iterations optimizer steps on one training batch (micro-batches, gradients summed over
    ranks). The loss of every rank is its share of the global batch loss (one normaliser for the whole
    batch). When no row of any rank is trained (the filter kept nothing, or every kept advantage is 0
    with beta = 0) the optimizer does not step: zero gradients would still move AdamW's weights by
    its momentum. Returns (sums for the metrics, grad norm, stepped)."""
    device = next(model.parameters()).device
    rows = [r for _, rs in batch for r in rs]
    local = [len(rows), sum(sum(r["mask"]) for r in rows), sum(r["trained"] for r in rows)]
    n_seq, n_tok, n_trained = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=device)).tolist()
    normaliser = loss_normaliser(n_seq, n_tok, cfg.loss_type, cfg.max_new_tokens)
    pick = lambda trained: [(p, [r for r in rs if r["trained"] == trained]) for p, rs in batch]
    trained = micro_batches([(p, rs) for p, rs in pick(True) if rs], cfg.micro_batch_size)
    frozen = micro_batches([(p, rs) for p, rs in pick(False) if rs], cfg.micro_batch_size)
    sharded = is_sharded(model)
    if sharded:  # every sharded forward and backward is a collective: all ranks run as many
        trained, frozen = pad_micro_batches(trained, device), pad_micro_batches(frozen, device)
    sums = dict.fromkeys(["loss", "entropy", "kl", "clip_low", "clip_high", "clip_region", "lp_diff", "lp_tokens",
                          "lp_diff_max", "forward_tokens"], 0.0)
    sums.update(zip(("seqs", "loss_tokens", "trained_seqs"), local))  # this rank's: the metrics sum over ranks
    with torch.no_grad():  # the rows with zero advantage: only their entropy and sampler gap are measured
        for mb in frozen:
            _forward_micro(model, mb, cfg, None if mb is PADDING else sums)
    if n_trained == 0:
        return sums, 0.0, False
    model.train()
    old_logps, ref_logps, grad_norm = {}, {}, 0.0
    for it in range(cfg.num_iterations):
        for k, mb in enumerate(trained):
            logp, mask, adv = _forward_micro(model, mb, cfg, sums if it == 0 and mb is not PADDING else None)
            if it == 0:  # same parameters as the sampler: this is the ratio's "old" policy (ratio = 1 now)
                old_logps[k] = logp.detach()
                if cfg.beta > 0:
                    with torch.no_grad(), autocast_for(device):
                        ref_logps[k], _ = completion_logprobs(ref_model, [(p, [r["tokens"] for r in rs])
                                                                          for p, rs in mb], cfg.temperature)
            loss = grpo_loss(logp, old_logps[k], adv, mask, cfg.loss_type, cfg.epsilon, cfg.epsilon_high,
                             cfg.beta, ref_logps.get(k), cfg.max_new_tokens, normaliser)
            loss.backward()
            if mb is PADDING:  # its loss is exactly 0: only the collectives were needed
                continue
            ratio = torch.exp(logp.detach() - old_logps[k])
            for key, value in clip_fractions(ratio, adv, mask, cfg.epsilon, cfg.epsilon_high).items():
                sums[key] += value * float(mask.sum())
            if cfg.beta > 0:
                sums["kl"] += float((k3_kl(logp.detach(), ref_logps[k]) * mask).sum())
            sums["loss"] += loss.item()
        params = [p for p in model.parameters() if p.requires_grad]  # sharded: the shards, now that backward is done
        for p in params:  # each rank's loss is its share of the global loss: SUM the gradients
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if not sharded:  # FSDP has summed them in backward (common.shard_model)
                all_reduce_sum(p.grad)
        grad_norm = clip_gradients(params, cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return sums, grad_norm, True


# A micro-batch that trains nothing: one token of a one-token prompt, outside the loss (mask 0). A rank
# with fewer micro-batches than another runs these so that every rank meets every collective.
PADDING = [([0], [{"tokens": [0], "sampler_logp": [0.0], "mask": [0], "adv": [0.0], "trained": True}])]


def pad_micro_batches(batches, device):
    """`batches` + PADDING up to the largest number of micro-batches on any rank."""
    n = torch.tensor([len(batches)], device=device)
    torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
    return batches + [PADDING] * (int(n) - len(batches))


def _forward_micro(model, mb, cfg, sums):
    """Teacher-forced logprobs of one micro-batch [(prompt, rows)] -> (logp, loss mask, advantages),
    each [N, C]. With `sums`, also adds this forward's entropy, sampler-vs-trainer logprob gap and
    token counts to them (the first pass: the policy that sampled)."""
    device = next(model.parameters()).device
    rows = [r for _, rs in mb for r in rs]
    c_max = max(len(r["tokens"]) for r in rows)
    mask = padded([r["mask"] for r in rows], c_max).to(device)
    adv = padded([r["adv"] for r in rows], c_max).to(device)
    with autocast_for(device):
        logp, entropy = completion_logprobs(model, [(p, [r["tokens"] for r in rs]) for p, rs in mb], cfg.temperature)
    if sums is not None:
        sums["forward_tokens"] += sum(len(p) + sum(len(r["tokens"]) for r in rs) for p, rs in mb)
        sums["entropy"] += float((entropy * mask).sum())
        filled = padded([[1] * len(r["tokens"]) for r in rows], c_max).to(device).bool()
        gap = (logp.detach() - padded([r["sampler_logp"] for r in rows], c_max).to(device)).abs()[filled]
        sums["lp_diff"] += float(gap.sum())
        sums["lp_tokens"] += gap.numel()
        sums["lp_diff_max"] = max(sums["lp_diff_max"], float(gap.max()))
    return logp, mask, adv


def step_metrics(groups, scored, sums, grad_norm, stepped, lr, cfg, t_rollout, t_train, device):
    """One step's metrics, summed over ranks then normalised. Definitions (TRL's where TRL has one):
    reward_mean / reward_std over all rollouts; zero_var_frac: groups whose rewards are all equal
    (flat_groups); loss: the batch loss, mean over the num_iterations optimizer steps; entropy: mean
    over the loss tokens of every kept rollout, at the first pass (the sampling policy); clip_low /
    clip_high / clip_region and kl: mean over the loss tokens of every kept rollout and over the
    iterations (a rollout with zero advantage is never clipped); format_fail, confidence (mean stated
    confidence of the answered dimensions), na_rate, no_confidence (dimensions answered without a
    confidence), majority_ratio (share of the G rollouts that gave the quasi label), difficulty,
    kept / too_easy / too_hard: the Conf-Profile scores of all rollouts of the step."""
    flat_rewards = scored.rewards.flatten()
    lengths = [len(s.tokens) for g in groups for s in g]
    flat = flat_groups(scored.rewards).flatten().tolist()
    local = {
        "rollouts_n": len(lengths), "users": len(groups), "reward_sum": float(flat_rewards.sum()),
        "reward_sq": float((flat_rewards ** 2).sum()), "zero_var_groups": sum(flat),
        "zero_var_kept": sum(f for f, k in zip(flat, scored.keep) if k), "kept_users": sum(scored.keep),
        "len_sum": sum(lengths), "truncated": sum(s.finish_reason == "length" for g in groups for s in g),
        **{k: v for k, v in sums.items() if k != "lp_diff_max"}, **scored.stats,
    }
    keys = sorted(local)
    t = dict(zip(keys, all_reduce_sum(torch.tensor([float(local[k]) for k in keys], dtype=torch.float64,
                                                          device=device)).tolist()))
    peak = torch.tensor([sums["lp_diff_max"]], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    n, per_tok, per_it_tok = max(t["rollouts_n"], 1), max(t["loss_tokens"], 1), max(t["loss_tokens"], 1) * cfg.num_iterations
    mean_r = t["reward_sum"] / n
    metrics = {
        "reward_mean": mean_r, "reward_std": math.sqrt(max(t["reward_sq"] / n - mean_r ** 2, 0.0)),
        "zero_var_frac": t["zero_var_groups"] / max(t["users"], 1),
        "completion_len": t["len_sum"] / n, "truncated_frac": t["truncated"] / n,
        "loss": t["loss"] / cfg.num_iterations if stepped else 0.0, "entropy": t["entropy"] / per_tok,
        "clip_low": t["clip_low"] / per_it_tok, "clip_high": t["clip_high"] / per_it_tok,
        "clip_region": t["clip_region"] / per_it_tok,
        "lp_diff_mean": t["lp_diff"] / max(t["lp_tokens"], 1), "lp_diff_max": float(peak),
        "grad_norm": grad_norm, "lr": lr, "loss_seqs": t["seqs"], "trained_seqs": t["trained_seqs"],
        "optimizer_step": int(stepped), "kept": int(t["kept_users"]),
        "rollout_s": t_rollout, "train_s": t_train, "rollout_tok_s": t["len_sum"] / max(t_rollout, 1e-9),
        "train_tok_s": t["forward_tokens"] / max(t_train, 1e-9),
        "zero_var_kept_frac": t["zero_var_kept"] / max(t["kept_users"], 1),
    }
    if "format_fail" in t:  # the Conf-Profile task's own statistics (score_profiles)
        metrics.update({
            "too_easy": int(t["too_easy"]), "too_hard": int(t["too_hard"]), "format_fail": t["format_fail"] / n,
            "confidence": t["conf_sum"] / max(t["answered"], 1), "na_rate": t["na"] / max(t["answered"], 1),
            "no_confidence": t["no_confidence"] / max(t["dim_slots"], 1),
            "majority_ratio": t["majority_sum"] / max(t["majority_n"], 1),
            "difficulty": t["difficulty_sum"] / max(t["users"], 1),
        })
    if cfg.beta > 0:
        metrics["kl"] = t["kl"] / per_it_tok
    return metrics


def grpo_step(model, ref_model, optimizer, prompts, score, cfg, generator, stop_ids, lr):
    """One GRPO step on this rank's prompts: rollouts -> scores (`score(groups) -> Scored`) ->
    advantages and the training batch -> policy update -> metrics (global over ranks)."""
    t0 = time.time()
    with full_parameters(model):  # sharded: gathered once, so the ranks decode on their own
        groups = sample_groups(model, prompts, cfg, generator, stop_ids)
    t_rollout = time.time() - t0
    scored = score(groups)
    batch, _ = training_batch(groups, prompts, scored, cfg)
    t1 = time.time()
    sums, grad_norm, stepped = policy_update(model, ref_model, optimizer, batch, cfg, lr)
    return step_metrics(groups, scored, sums, grad_norm, stepped, lr, cfg, t_rollout, time.time() - t1,
                        next(model.parameters()).device)


# -----------------------------------------------------------------------------
# The loop


def step_seed(seed, step, rank):
    """Rollout randomness is a pure function of (seed, step, rank): a resumed run samples what the
    uninterrupted one would have, and each rank samples differently."""
    return (seed * 1_000_003 + step * 9_973 + rank * 101) % (2 ** 63)


def train(cfg, model, next_batch, stop_ids, rank=0, world_size=1, ref_model=None, dev_eval=None, probe=None,
          made_by=None):
    """GRPO steps from the saved state (with cfg.resume) to cfg.max_steps.

    next_batch(step) -> (prompts: this rank's list of token-id prompts, score: groups -> Scored).
    dev_eval(model) -> dict of dev metrics (rank 0 only; may be None); probe(model) -> {"probe_agreement"}
    every probe_every steps (rank 0 only; may be None). Every step appends one line to
    output_dir/metrics.jsonl; every save_every steps the model, optimizer, step and RNG states go to
    output_dir/train_state atomically, with `made_by` (common.run_record: what produced the run). Returns
    the number of steps done."""


    device = next(model.parameters()).device
    main_process = rank == 0
    optimizer = build_optimizer(model, cfg)
    state_dir = os.path.join(cfg.output_dir, "train_state")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    start = 0
    if cfg.resume:
        start, _ = load_training_state(state_dir, model, optimizer)
    log = None
    if main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        log = open_metrics(metrics_path, start)  # a resumed run drops the lines of steps after its checkpoint
    if start == 0 and cfg.eval_every and cfg.dev_data:  # every rank decides alike: a sharded model gathers
        with full_parameters(model):
            if main_process and dev_eval is not None:
                record = {"step": 0, **dev_eval(model)}
                append_jsonl(log, record)
                print(f"step 0 (the starting policy): {fmt_metrics(record)}", flush=True)
    barrier()
    bar = Progress(cfg.max_steps, "grpo", "step", initial=start, disable=not main_process)
    step = start
    for step in range(start, cfg.max_steps):
        if cfg.stop_after_steps and step - start >= cfg.stop_after_steps:
            break  # as if killed: no save
        prompts, score = next_batch(step)
        generator = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, rank))
        metrics = grpo_step(model, ref_model, optimizer, prompts, score, cfg, generator, stop_ids, lr_at(step, cfg))
        done = step + 1
        record = {"step": done, **metrics}
        # every rank decides from the config alone (the measures exist on rank 0 only), so all meet at the barrier
        for every, measure in ((cfg.eval_every if cfg.dev_data else 0, dev_eval),
                               (cfg.probe_every if cfg.probe_size else 0, probe)):
            if every and (done % every == 0 or done == cfg.max_steps):
                with full_parameters(model):
                    if main_process and measure is not None:
                        record.update(measure(model))
                barrier()
        if main_process:
            append_jsonl(log, record)
            bar.set_postfix_str(fmt_metrics(record))
            bar.update(1)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:  # every rank: sharded, each its part
            save_training_state(state_dir, model, optimizer, done, {}, made_by)
            barrier()
    else:
        step = cfg.max_steps
    bar.close()
    if log is not None:
        log.close()
    return step


def fmt_metrics(record):
    """The one-line summary of a step for the progress bar."""
    short = {"reward_mean": "r", "reward_std": "r_sd", "zero_var_frac": "0var", "kept": "kept",
             "format_fail": "fmt_fail", "confidence": "conf", "na_rate": "na", "majority_ratio": "maj",
             "probe_agreement": "probe", "completion_len": "len",
             "entropy": "H", "kl": "kl", "clip_region": "clip", "grad_norm": "|g|", "lp_diff_max": "lp_gap",
             "rollout_s": "t_roll", "train_s": "t_train", "dev_avg_f1": "dev_f1", "dev_confidence": "dev_conf"}
    return " ".join(f"{name}={record[k]:.3g}" if isinstance(record[k], float) else f"{name}={record[k]}"
                    for k, name in short.items() if k in record)


# -----------------------------------------------------------------------------
# Conf-Profile data: unlabelled users, frozen Stage-1 confidence, a labelled dev slice


def read_stage1(path, taxonomy):
    """{user_id: {dim: calibrated confidence}} from calibrate.py's sft.jsonl ("calibrated" field)."""
    out, dims = {}, list(taxonomy["dimensions"])
    for _, where, record in iter_jsonl(path, expected="one calibrate.py SFT record per line"):
        uid = record.get("user_id") if isinstance(record, dict) else None
        if not isinstance(uid, str) or not uid:
            raise DataError(f"{where}: user_id: expected a non-empty string, got {uid!r}")
        calibrated = record.get("calibrated")
        if not (isinstance(calibrated, dict) and set(calibrated) == set(dims) and all(
                type(c) is int and 1 <= c <= 10 for c in calibrated.values())):
            raise DataError(f"{where}: calibrated: expected {{dim: int 1..10}} for dims {dims}, "
                            f"got {json.dumps(calibrated, ensure_ascii=False)[:120]}")
        out[uid] = calibrated
    return out


def greedy_answers(model, tokenizer, prompts, taxonomy, stop_ids, max_new_tokens):
    """The policy's greedy answers to `prompts`, parsed."""
    groups = generate(model, prompts, SamplingParams(max_new_tokens, temperature=0.0, stop_ids=tuple(stop_ids)),
                      tokenizer=tokenizer)
    return [parse_answer(completion_text(tokenizer, g[0], set(stop_ids)), taxonomy) for g in groups]


def label_agreement(answers, reference):
    """Share of (user, dimension) pairs where two sets of parsed answers give the same label (an
    invalid answer has label None). Stage 2 logs it for the policy's greedy answers on a fixed probe
    set of training users against the SFT student's: RL on self-consistency can drift far from
    where it started (collapse to one label, to NA) long before a labelled metric shows it."""
    pairs = [((a["dims"][d] or {}).get("label"), (b["dims"][d] or {}).get("label"))
             for a, b in zip(answers, reference) for d in a["dims"]]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def greedy_eval(model, tokenizer, users, prompts, taxonomy, stop_ids, max_new_tokens):
    """Greedy answers on labelled users, scored by evaluate.py: avg F1, the mean stated confidence
    (all dimensions, NA included: what the policy says) and evaluate.py's mean confidence of the
    non-abstained predictions, format failures."""
    parsed = greedy_answers(model, tokenizer, prompts, taxonomy, stop_ids, max_new_tokens)
    failures = sum(not p["format_ok"] for p in parsed) / max(len(parsed), 1)
    metrics = evaluate({u["user_id"]: profile_from_parse(p) for u, p in zip(users, parsed)}, users, taxonomy, failures)
    stated = [v["confidence"] for p in parsed for v in p["dims"].values() if v and v["confidence"]]
    return {"dev_avg_f1": metrics["avg_f1"], "dev_confidence": sum(stated) / max(len(stated), 1),
            "dev_mean_confidence": metrics["mean_confidence"], "dev_format_fail": failures}


def run(cfg, rank, world_size, device, made_by=None):

    main_process = rank == 0
    torch.manual_seed(cfg.seed)
    taxonomy = load_taxonomy(cfg.taxonomy or None)
    tokenizer = load_tokenizer(cfg.model)
    stop_ids = stop_ids_for(tokenizer)
    users = read_users(cfg.data, taxonomy=taxonomy)
    stage1 = None
    if "stage1" in (cfg.difficulty, cfg.confidence_weighting):
        stage1 = read_stage1(cfg.stage1, taxonomy)
        missing = len(users)
        users = [u for u in users if u["user_id"] in stage1]  # Stage 1 left out users no teacher answer parsed
        missing -= len(users)
        if main_process and missing:
            print(f"{cfg.stage1}: {missing} users of {cfg.data} have no Stage-1 confidence; left out", flush=True)
    if len(users) < cfg.batch_size:
        raise ValueError(f"{cfg.data}: {len(users)} users; expected at least batch_size={cfg.batch_size}")
    prompt_cache = {}

    def prompt_ids(user):
        if user["user_id"] not in prompt_cache:
            prompt_cache[user["user_id"]] = chat_prompt_ids(tokenizer, render_prompt(user, taxonomy), **cfg.chat_template_kwargs)
        return prompt_cache[user["user_id"]]

    steps_per_epoch = len(users) // cfg.batch_size

    def next_batch(step):
        """The data order is a pure function of (seed, epoch): the step number is the data position."""
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(users), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).tolist()
        mine = [users[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size][rank::world_size]]
        return [prompt_ids(u) for u in mine], lambda groups: score_profiles(groups, mine, taxonomy, tokenizer, cfg, stage1)

    dev_eval = None
    if cfg.dev_data and main_process:
        dev_users = read_users(cfg.dev_data, require_labels=True, taxonomy=taxonomy)[: cfg.dev_size]
        dev_prompts = [prompt_ids(u) for u in dev_users]
        eval_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
        dev_eval = lambda m: greedy_eval(m, tokenizer, dev_users, dev_prompts, taxonomy, stop_ids, eval_tokens)

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    model = load_model(cfg.model, dtype=dtype, device=device)
    if cfg.lora_rank:  # the base frozen; the optimizer and the training state see the adapters only
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    ref_model = None
    if cfg.beta > 0:  # the KL reference is the starting checkpoint, frozen; not loaded at all when beta = 0
        # LoRA: the policy's own base with its adapters off IS the starting checkpoint: no second copy
        ref_model = (AdaptersOff(model) if cfg.lora_rank
                     else load_model(cfg.model, dtype=dtype, device=device).requires_grad_(False))
    probe = None
    if cfg.probe_size and main_process:  # the reference: the starting checkpoint's greedy answers
        probe_prompts = [prompt_ids(u) for u in users[: cfg.probe_size]]
        probe_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
        reference = greedy_answers(model, tokenizer, probe_prompts, taxonomy, stop_ids, probe_tokens)
        probe = lambda m: {"probe_agreement": label_agreement(
            greedy_answers(m, tokenizer, probe_prompts, taxonomy, stop_ids, probe_tokens), reference)}
    if cfg.parallel == "fsdp" and world_size > 1:
        shard_model(model, device)
        if ref_model is not None:
            shard_model(ref_model, device)
    if main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config(cfg, cfg.output_dir, name="rl_config.json", extra={"_inputs": (made_by or {}).get("inputs", {})})
        print("config: " + json.dumps(dataclasses.asdict(cfg), ensure_ascii=False), flush=True)
        n_params = sum(p.numel() for p in model.parameters())
        n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trained = f", {n_trained / 1e6:.2f}M trained" if n_trained < n_params else ""
        print(f"model: {cfg.model} ({n_params / 1e6:.2f}M parameters{trained}, {cfg.dtype}) on {device}; {len(users)} users, "
              f"{cfg.batch_size} x {cfg.num_generations} rollouts per step, {world_size} process(es)", flush=True)
    t0 = time.time()
    done = train(cfg, model, next_batch, stop_ids, rank, world_size, ref_model, dev_eval, probe, made_by)
    if done < cfg.max_steps:
        if main_process:
            print(f"stopped after step {done} of {cfg.max_steps} (stop_after_steps); resume with --resume", flush=True)
        return None
    weights = full_state_dict(model, rank) if is_sharded(model) else None  # every rank: the shards are all-gathered
    if main_process:
        save_model(model, cfg.output_dir, tokenizer_dir=cfg.model, state=weights)  # LoRA: merged into the base weights
        if cfg.lora_rank and cfg.lora_save_adapter:
            save_adapter(model, os.path.join(cfg.output_dir, "adapter"), base_model=os.path.abspath(cfg.model))
        shutil.rmtree(os.path.join(cfg.output_dir, "train_state"), ignore_errors=True)  # finished: 3x the model, dead weight
        print(f"saved the final checkpoint to {cfg.output_dir} ({time.time() - t0:.0f}s of RL); training curves: "
              f"{draw_training_curves(cfg.output_dir)}", flush=True)
    barrier()
    return cfg.output_dir


def main(argv=None):
    cfg, rank, world_size, _, device = setup_run(RLConfig, argv, DEFAULT_CONFIG, "rl.py", __doc__.strip().split("\n\n")[0])
    try:
        if cfg.batch_size % world_size:
            raise ConfigError(f"batch_size {cfg.batch_size}: expected a multiple of the number of processes {world_size}")
        uses_stage1 = "stage1" in (cfg.difficulty, cfg.confidence_weighting)
        made_by = run_record(cfg, PATH_KEYS, {"data": cfg.data, "stage1": cfg.stage1 if uses_stage1 else "",
                                             "taxonomy": cfg.taxonomy or DEFAULT_TAXONOMY})
        made_by["layout"] = {"parallel": cfg.parallel, "world_size": world_size}
        check_output_dir(cfg, made_by, RESUME_MAY_CHANGE, rank)
        return run(cfg, rank, world_size, device, made_by)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"rl.py: error: {e}")
