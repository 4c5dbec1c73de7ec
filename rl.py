"""
Stage 2 of Conf-Profile: confidence-guided GRPO on unlabelled users (docs/design.md, "Stage 2").

    python rl.py                                   # CPU demo: configs/rl_demo.json, from runs/demo/sft
    python rl.py --config configs/X.json [--key value ...] [--resume]
    torchrun --nproc_per_node=2 rl.py ...          # data-parallel: each process its own users
    torchrun --nproc_per_node=2 rl.py --parallel fsdp   # and the model sharded (FSDP2): docs/fsdp.md

There are no labels. For each of B users the policy writes G profiles (one prompt, G rollouts). The
confidence-weighted vote of those G profiles is the truth ("quasi label"), each rollout is rewarded
for agreeing with it, and the policy is pushed towards the rollouts that agreed, GRPO-style.

Kept from GRPO (TRL's GRPOTrainer option names): G samples per prompt, group-relative advantages and
no value network (`scale_rewards`); the clipped surrogate with clip-higher (`epsilon`, `epsilon_high`),
`num_iterations` passes over a batch; the token-loss normalisations (`loss_type`); k3 KL to the
starting checkpoint (`beta`, default 0: no reference). Added by Conf-Profile, each an option:
  * quasi labels (`quasi_label`, `na_weight`): the Stage-1 vote over the G rollouts;
  * difficulty filter (`difficulty`, `low`, `high`): train on users whose rollouts agree moderately;
  * reward r_j = fmt_j + (1/|D|) sum_d w_jd * s_jd: agreeing with the quasi label earns, disagreeing
    costs its stated confidence (`agreement`), an unparseable answer or a missing confidence costs -1;
  * frozen confidence (`confidence_weighting`): the tokens that state a confidence are cut out of the
    loss, so RL cannot inflate the number it is weighted by;
  * credit per dimension (`advantage`): each dimension's own advantage on its answer's tokens.
Later label-free RL as switches, each off by default: `calibration_reward` (RLCR's Brier term),
`min_vote_share` (SRT/EMPO's vote-share gating), `vote_pool` (TTRL: vote over more rollouts than trained).
A control, off by default: `shuffle_rewards` (each group's rewards dealt out at random: no signal).
Dropped: value and reward models, entropy bonuses, vLLM / TRL machinery. Rollouts share each prompt's
KV cache (rollout.generate), and so does training (rl_bookkeeping.pack_groups: one row [prompt, c1..cG]).

Reads top-down: the RL keys; grpo_step, one step as seven phases (rollouts -> parse -> quasi labels ->
difficulty and filter -> rewards -> advantages and token maps -> policy update); the formulas of each
phase in that order; below the BOOKKEEPING line the run: config, data, run and main. The packed forward,
the metrics, the probe and the dev evaluation are rl_bookkeeping.py's; the loop, saving and the
processes trainer.py's. Metrics: output_dir/metrics.jsonl, drawn at the end in
output_dir/training_curves.png (plots.py).
"""
import os
import time
from collections import namedtuple
from dataclasses import dataclass, field

import torch

from common import ConfigError, chat_prompt_ids, load_tokenizer, opt, run_cli, stop_ids_for
from confprofile import (DEFAULT_TAXONOMY, load_taxonomy, parse_answer_spans, read_stage1, read_users, render_prompt,
                         stated_answers, vote)
from distributed import PARALLEL, all_reduce_sum, cleanup_distributed
from rl_bookkeeping import (SHORT, clip_fractions, completion_char_ends, completion_logprobs, even_micro_batches,
                            forward_micro, gathered, mechanism_stats, measures, new_sums, profile_stats,
                            quasi_label_accuracy, sample, step_metrics, users_of_step)
from rollout import SamplingParams
from trainer import RESUME_MAY_CHANGE as TRAINER_MAY_CHANGE
from trainer import (TrainingConfig, announce, autocast_for, build_policy, build_reference, default, finish,
                     guard_output_dir, hold_output_dir, optimizer_step, shard, start, train)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "rl_demo.json")
CHOICES = {
    "quasi_label": ("confidence", "majority"),
    "difficulty": ("rollout", "stage1", "off"),
    "confidence_weighting": ("rollout_masked", "stage1", "live", "off"),
    "agreement": ("weighted", "flat"),
    "scale_rewards": ("group", "none"),
    "advantage": ("dimension", "sequence"),
    "loss_type": ("dapo", "grpo", "dr_grpo"),
}


@dataclass
class RLKeys:
    """The keys of Stage 2 (RLConfig, at the bookkeeping line, adds the optimiser and runtime ones)."""
    model: str = opt("runs/demo/sft", "HF checkpoint dir of the SFT student (also the KL reference)", nonempty=True)
    data: str = opt("runs/demo/world/train.jsonl", "unlabelled users (JSONL)", nonempty=True)
    stage1: str = opt("runs/demo/sft.jsonl", "calibrate.py's SFT set: the frozen Stage-1 confidences that "
                      "difficulty=stage1 and confidence_weighting=stage1 read")
    taxonomy: str = opt("", "taxonomy JSON (empty: taxonomy.json of the repository)")
    output_dir: str = opt("runs/demo/rl", "the final HF checkpoint, rl_config.json, metrics.jsonl, train_state/",
                          nonempty=True)
    chat_template_kwargs: dict = opt({}, 'passed to the chat template, e.g. {"enable_thinking": false} for Qwen3')
    batch_size: int = opt(4, "B: users per step, all processes together", min=1)
    num_generations: int = opt(8, "G: rollouts per user (advantages are relative within these)", min=2)
    vote_pool: int = opt(0, "TTRL: rollouts per user the quasi labels and difficulty vote over, >= G; only the first "
                         "G are trained (0 = the G trained ones)", min=0)
    max_new_tokens: int = opt(256, "longest rollout (TRL: max_completion_length)", min=1)
    temperature: float = opt(1.0, "sampling temperature, also of the ratio's logprobs", gt=0)
    top_k: int = opt(0, "sample from the k most likely tokens (0 = all)", min=0)
    top_p: float = opt(1.0, "nucleus mass to sample from (1 = all)", gt=0, max=1)
    max_batch_tokens: int = opt(0, "KV-cache slots per generate() batch (0 = the device's default)", min=0)
    quasi_label: str = opt("confidence", "quasi label: the vote of the G rollouts weighted by stated confidence, or "
                           "a plain majority", choices=CHOICES["quasi_label"])
    na_weight: float = opt(1.0, "weight of the NA votes in the quasi-label vote (1 = as in Stage 1; below 1 a label "
                           "the rollouts agree on outvotes a few hesitant NAs)", min=0)
    min_vote_share: float = opt(0.0, "vote-share gating (SRT/EMPO): a quasi label given by fewer than this share "
                                "of the rollouts that answered its dimension gives r_jd = 0 (0 = off)", min=0, max=1)
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
    calibration_reward: float = opt(0.0, "lambda of RLCR's Brier term -lambda (c/10 - 1[label = quasi label])^2 "
                                    "added to r_jd; > 0 trains the confidence tokens, so only with "
                                    "confidence_weighting live or off (0 = off: the paper's reward)", min=0)
    shuffle_rewards: bool = opt(False, "control: deal each group's rewards out to its rollouts in a random order "
                                "(the same steps and updates, no signal)")
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
    max_steps: int = opt(20, "GRPO steps", min=1)
    seed: int = opt(0, "data order and rollout randomness", min=0)
    dev_data: str = opt("", "labelled users for a periodic greedy evaluation (empty: none)")
    dev_size: int = opt(100, "dev users evaluated", min=1)
    eval_every: int = opt(0, "steps between dev evaluations (0 = none)", min=0)
    eval_max_new_tokens: int = opt(0, "greedy answer length of the dev evaluation and the probe (0 = max_new_tokens)",
                                   min=0)
    dev_vote_size: int = opt(0, "dev users whose sampled rollouts (vote_pool, else G) vote quasi labels at each dev "
                             "evaluation: dev_quasi_acc, TTRL's label accuracy (0 = none)", min=0)
    probe_size: int = opt(32, "training users whose greedy answers are compared with the SFT student's (0 = no probe)",
                          min=0)
    probe_every: int = opt(10, "steps between probes (and at the last step)", min=0)

    @property
    def mask_confidence(self):
        """Frozen confidence: all weighting modes but `live` cut the confidence tokens out (not with a Brier term)."""
        return self.confidence_weighting != "live" and self.calibration_reward == 0


# -----------------------------------------------------------------------------
# One GRPO step


def grpo_step(model, ref_model, optimizer, users, task, cfg, generator, lr):
    """One GRPO step on this process's users, in seven phases; returns the step's metrics. `task`: what the
    phases read besides the rollouts (Task, below)."""
    t0 = time.time()
    prompts = [task.prompt(u) for u in users]
    groups = sample_groups(model, prompts, cfg, generator, task.stop_ids)                    # 1. rollouts
    t_rollout = time.time() - t0
    answers = [read_rollouts(samples, task) for samples in groups]                          # 2. parse
    quasi = [quasi_labels([a.parsed for a in reads], task.taxonomy, cfg.quasi_label, cfg.na_weight)
             for reads in answers]                                                          # 3. quasi labels
    frozen = [task.stage1[u["user_id"]] if task.stage1 is not None else None for u in users]
    levels, keep, counts = difficulty_filter(quasi, answers, frozen, cfg)                   # 4. difficulty, filter
    labels = [vote_share_gate([a.parsed for a in reads], q, cfg.min_vote_share)
              for reads, q in zip(answers, quasi)]                                          # 5. rewards: the gated
    groups, answers = trained_rollouts(groups, answers, cfg.num_generations)                #    labels, the first G
    dim_rewards, rewards = group_rewards(answers, labels, frozen, cfg)                      #    of a vote pool
    signal = shuffled_rewards(dim_rewards, rewards, generator) if cfg.shuffle_rewards else (dim_rewards, rewards)
    maps = token_maps(answers, task.taxonomy, cfg)                                          # 6. advantages and
    batch = training_batch(groups, prompts, signal[1], keep, maps, cfg, signal[0])          #    token maps
    t1 = time.time()
    sums, grad_norm, stepped = policy_update(model, ref_model, optimizer, batch, cfg, lr)   # 7. policy update
    stats = {**profile_stats(answers, quasi, levels, counts, task.taxonomy),
             **mechanism_stats(answers, rewards, group_rewards(answers, labels, frozen, cfg, "off")[1], task.taxonomy,
                               cfg.na_weight)}
    return step_metrics(groups, rewards, flat_groups(rewards), keep, stats, sums, grad_norm, stepped, lr, cfg,
                        t_rollout, time.time() - t1, next(model.parameters()).device)


@dataclass
class Task:
    """What the Conf-Profile phases read besides the rollouts: the tokenizer (a rollout's text), the
    taxonomy, the stop ids, the frozen Stage-1 confidences {user_id: {dim: c}} (None: not read)."""
    tokenizer: object
    taxonomy: dict
    stop_ids: list
    stage1: dict = None
    template_kwargs: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)  # user_id -> prompt token ids, rendered once

    def render(self, user):
        """The prompt token ids of one user (uncached: dev users, whose ids may also be training users')."""
        return chat_prompt_ids(self.tokenizer, render_prompt(user, self.taxonomy), **self.template_kwargs)

    def prompt(self, user):
        """render(user) of a training user, rendered once."""
        if user["user_id"] not in self.prompts:
            self.prompts[user["user_id"]] = self.render(user)
        return self.prompts[user["user_id"]]


# -----------------------------------------------------------------------------
# 1. Rollouts


def sample_groups(model, prompts, cfg, generator, stop_ids, gathered=False):
    """G samples (vote_pool > 0: vote_pool) of each of this process's prompts from the current policy
    (rl_bookkeeping.sample: rollout.generate with every parameter at hand, unless already `gathered`)."""
    model.eval()
    sampling = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, tuple(stop_ids),
                              cfg.max_batch_tokens)
    return sample(model, prompts, sampling, cfg.vote_pool or cfg.num_generations, generator, gathered)


# -----------------------------------------------------------------------------
# 2. Parse: one parse of one text per rollout gives the reward's answers and both token maps.
# The maps come from confprofile.parse_answer_spans, the parser that reads the reward's inputs, so
# every confidence the reward reads is a masked one, whatever the key's spelling.

Read = namedtuple("Read", "parsed spans ends")  # parse_answer_spans' answer and spans; each token's end offset


def read_rollouts(samples, task):
    """Each rollout of one user read as the reward reads it (completion_char_ends), parsed once."""
    out = []
    for s in samples:
        text, ends = completion_char_ends(task.tokenizer, s.tokens, set(task.stop_ids))
        parsed, spans = parse_answer_spans(text, task.taxonomy)
        out.append(Read(parsed, spans, ends))
    return out



# -----------------------------------------------------------------------------
# 3. Quasi labels


def quasi_labels(parsed, taxonomy, weighting="confidence", na_weight=1.0):
    """Stage 2 quasi ground truth: the Stage-1 vote over one user's G rollouts.

    S_k = sum_j c_j * 1[y_j = k] (weighting="confidence") or sum_j 1[y_j = k] ("majority"); the quasi
    label is argmax_k S_k with pooled confidence (S_y / sum_k S_k) * mean{c_j : y_j = y}. Only
    rollouts that parse take part, and of those only the dimensions with a stated confidence
    (confprofile.stated_answers). na_weight < 1 discounts the votes for NA (confprofile.vote_scores).
    Returns confprofile.vote's {dim: {"label", "pooled_confidence", "n_valid", ...} | None}.
    """
    valid = [stated_answers(p) for p in parsed if p["format_ok"]]
    if not valid:
        return {d: None for d in taxonomy["dimensions"]}
    return vote(valid, taxonomy, weighting=weighting, na_weight=na_weight)


def vote_share_gate(parsed, quasi, min_share):
    """Vote-share gating (SRT / EMPO): d's quasi label is trained on iff share_d = #{j : y_jd = q_d} / n_d
    >= min_share, over the n_d rollouts that parse and state an answer for d (plain counts, whatever
    `quasi_label` weights; with a vote pool, all of it). A gated label becomes None for phase 5: every
    rollout gets r_jd = 0, adding 0 to r_j, and d's advantage is exactly 0 (a flat group); the difficulty
    and the metrics (but reward_flip) still read the full vote. min_share = 0 keeps every label."""
    if not min_share:
        return quasi
    valid = [stated_answers(p)["dims"] for p in parsed if p["format_ok"]]
    return {d: q if q is None or sum((v[d] or {}).get("label") == q["label"] for v in valid) / q["n_valid"]
            >= min_share else None for d, q in quasi.items()}


# -----------------------------------------------------------------------------
# 4. Difficulty and filter


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


def difficulty_filter(quasi, answers, frozen, cfg):
    """Phase 4 for B users: each user's difficulty (the Stage-1 confidence with difficulty=stage1), and
    which users the filter keeps (everyone with difficulty=off). Returns (levels, keep, counts)."""
    levels = [difficulty(q, len(reads), f if cfg.difficulty == "stage1" else None)
              for q, reads, f in zip(quasi, answers, frozen)]
    keep, counts = difficulty_mask([None if cfg.difficulty == "off" else v for v in levels], cfg.low, cfg.high)
    return levels, keep, counts


def trained_rollouts(groups, answers, n):
    """Vote pool (TTRL, vote_pool > G): quasi labels, gate and difficulty read all vote_pool rollouts of a
    user; rewards, advantages and update only the first G = n. Without a pool nothing is cut."""
    return [g[:n] for g in groups], [a[:n] for a in answers]


# -----------------------------------------------------------------------------
# 5. Rewards


def dimension_rewards(parsed, quasi, weighting, stage1_confidence=None, agreement="flat", calibration=0.0):
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
    An unparseable answer gets -1 on every dimension; a dimension it left invalid, or answered without
    a stated confidence (confprofile.stated_answers), -1 (a wrong answer at full weight: omitting is
    never a way out); a dimension with no quasi label (no rollout answered it) 0.
    calibration = lambda > 0 (RLCR's Brier term) subtracts lambda * (c_jd/10 - 1[y_jd = q_d])^2 from r_jd on
    each dimension with a stated confidence and a quasi label, so r_j gains
    -lambda * (1/|D|) sum_d (c_jd/10 - 1[y_jd = q_d])^2 (|D| all dimensions; the others add 0).
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
        if calibration and q is not None and answer is not None:
            out[-1] -= calibration * (answer["confidence"] / 10 - (answer["label"] == q["label"])) ** 2
    return out


def rollout_reward(parsed, quasi, weighting, stage1_confidence=None, agreement="flat", calibration=0.0):
    """Stage 2 reward of one rollout: r_j = fmt_j + (1/|D|) sum_d w_jd * s_jd  (= the mean of
    dimension_rewards; see there for w, s, the `agreement` option and the Brier term `calibration`).

    fmt_j = -1 if the answer does not parse (and then no agreement terms), else 0. |D| is the
    number of dimensions of the taxonomy (the keys of `quasi`). The mean is taken in float64 by torch,
    so a rollout's r_j is the same number whether it is computed alone or in a batch.
    """
    if not parsed["format_ok"]:
        return -1.0
    terms = dimension_rewards(parsed, quasi, weighting, stage1_confidence, agreement, calibration)
    return torch.tensor(terms, dtype=torch.float64).mean().item()


def group_rewards(answers, quasi, frozen, cfg, weighting=None):
    """Phase 5 for B users of G rollouts: r_jd (dimension_rewards) [B, G, D] and r_j (rollout_reward)
    [B, G], both float64, against `quasi` (in grpo_step the labels that pass vote_share_gate);
    `weighting` in place of cfg.confidence_weighting (the metrics' reward_flip)."""
    args = (weighting or cfg.confidence_weighting,)
    per_dim = [[dimension_rewards(a.parsed, q, *args, f, cfg.agreement, cfg.calibration_reward) for a in reads]
               for reads, q, f in zip(answers, quasi, frozen)]
    per_rollout = [[rollout_reward(a.parsed, q, *args, f, cfg.agreement, cfg.calibration_reward) for a in reads]
                   for reads, q, f in zip(answers, quasi, frozen)]
    return torch.tensor(per_dim, dtype=torch.float64), torch.tensor(per_rollout, dtype=torch.float64)


def shuffled_rewards(dim_rewards, rewards, generator):
    """The no-signal control: the rewards of each group dealt out again in a random order, r'_j = r_pi(j)
    and r'_jd = r_pi(j)d with pi a uniform permutation of the group's G rollouts (one per user, from
    `generator`). Each group keeps its reward values, so the same rows are trained with advantages of
    the same size, but which rollout gets which is chance: the same steps and updates, no signal."""
    keys = torch.rand(rewards.shape, generator=generator, device=generator.device).cpu()
    order = torch.argsort(keys, dim=1)                                                 # [B, G]
    return dim_rewards.gather(1, order[..., None].expand_as(dim_rewards)), rewards.gather(1, order)


# -----------------------------------------------------------------------------
# 6. Advantages and token maps


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


def token_advantages(dim_advantages, seq_advantage, token_dims):
    """Per-token advantages of one rollout: a token inside dimension d's answer gets A_jd (the
    group-relative advantage of r_jd), a token outside every dimension's answer (braces between
    answers, a <think> block, the end-of-turn token) the advantage of the whole reward.
    dim_advantages [D], token_dims [T] ints (-1 = outside)."""
    return [seq_advantage if d < 0 else dim_advantages[d] for d in token_dims]


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


def token_maps(answers, taxonomy, cfg):
    """Phase 6's token maps of B users' rollouts: the loss mask (0 on the tokens of a stated confidence
    unless confidence_weighting=live) and, with advantage=dimension, each token's dimension (else None)."""
    masks = [[[0 if c else 1 for c in confidence_token_mask(a.ends, a.spans)] if cfg.mask_confidence
              else [1] * len(a.ends) for a in reads] for reads in answers]
    dims = None
    if cfg.advantage == "dimension":
        dims = [[dimension_token_index(a.ends, a.spans, taxonomy) for a in reads] for reads in answers]
    return masks, dims


def training_batch(groups, prompts, rewards, keep, maps, cfg, dim_rewards=None):
    """Phase 6: advantages -> the training batch: [(prompt, rows)] for every kept user, a row per rollout
    with its tokens, sampler logprobs, loss mask and one advantage per token. rewards [B, G]; maps
    (loss masks, token dimensions or None: token_maps); dim_rewards [B, G, D] for per-dimension credit.
    A row is `trained` unless its advantages are all exactly 0 and beta = 0: then its loss and gradient
    are exactly 0, so only a no-grad forward is run for it (its tokens still count in the loss
    normaliser and the metrics)."""
    masks, token_dims = maps
    advantages = group_advantages(rewards, cfg.scale_rewards)                          # [B, G]
    per_dimension = cfg.advantage == "dimension" and token_dims is not None
    if per_dimension:
        dim_advantages = group_advantages(dim_rewards, cfg.scale_rewards)              # [B, G, D]
    batch = []
    for i, samples in enumerate(groups):
        if not keep[i]:
            continue
        rows = []
        for j, s in enumerate(samples):
            adv = (token_advantages(dim_advantages[i, j].tolist(), float(advantages[i, j]), token_dims[i][j])
                   if per_dimension else [float(advantages[i, j])] * len(s.tokens))
            rows.append({"tokens": s.tokens, "sampler_logp": s.logprobs, "mask": masks[i][j], "adv": adv,
                         "trained": cfg.beta > 0 or any(a != 0.0 for a in adv)})
        batch.append((prompts[i], rows))
    return batch


# -----------------------------------------------------------------------------
# 7. Policy update


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
    all processes): dapo = loss tokens; grpo = sequences (each sequence's token mean is taken first, see
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


def policy_update(model, ref_model, optimizer, batch, cfg, lr):
    """Phase 7: num_iterations optimizer steps on one training batch, in micro-batches. The loss of every
    process is its share of the global batch loss (one normaliser for the whole batch; trainer.py sums
    the gradients). When no row of any process is trained (the filter kept nothing, or every kept
    advantage is 0 with beta = 0) the optimizer does not step: zero gradients would still move AdamW's
    weights by its momentum. Returns (sums for the metrics, grad norm, stepped)."""
    device = next(model.parameters()).device
    rows = [r for _, rs in batch for r in rs]
    local = [len(rows), sum(sum(r["mask"]) for r in rows), sum(r["trained"] for r in rows)]
    n_seq, n_tok, n_trained = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=device)).tolist()
    normaliser = loss_normaliser(n_seq, n_tok, cfg.loss_type, cfg.max_new_tokens)
    trained, frozen = (even_micro_batches(model, [(p, [r for r in rs if r["trained"] == t]) for p, rs in batch], cfg)
                       for t in (True, False))
    sums = new_sums(local)
    with torch.no_grad():  # the rows with zero advantage: only their entropy and sampler gap are measured
        for mb in frozen:
            forward_micro(model, mb, cfg, sums)
    if n_trained == 0:
        return sums, 0.0, False
    model.train()
    cache, grad_norm = {}, 0.0
    for it in range(cfg.num_iterations):
        for k, mb in enumerate(trained):
            surrogate_backward(model, ref_model, mb, (it, k), cache, cfg, normaliser, sums)
        grad_norm = optimizer_step(model, optimizer, cfg, lr)
    model.eval()
    return sums, grad_norm, True


def surrogate_backward(model, ref_model, mb, at, cache, cfg, normaliser, sums):
    """Backward of grpo_loss on micro-batch k at iteration it (at = (it, k)). The first pass runs the
    parameters that sampled: its logprobs are the ratio's "old" policy (ratio = 1 then), kept in
    `cache` with the reference's logprobs (beta > 0) for the later passes."""
    (it, k), device = at, next(model.parameters()).device
    logp, mask, adv = forward_micro(model, mb, cfg, sums if it == 0 else None)
    if it == 0:
        cache[k] = (logp.detach(), None)
        if cfg.beta > 0:
            with torch.no_grad(), autocast_for(device):
                ref_logp, _ = completion_logprobs(ref_model, [(p, [r["tokens"] for r in rs]) for p, rs in mb],
                                                  cfg.temperature)
            cache[k] = (logp.detach(), ref_logp)
    old_logp, ref_logp = cache[k]
    loss = grpo_loss(logp, old_logp, adv, mask, cfg.loss_type, cfg.epsilon, cfg.epsilon_high, cfg.beta, ref_logp,
                     cfg.max_new_tokens, normaliser)
    loss.backward()  # a padding micro-batch's mask is all 0: it adds exactly 0 to every sum below
    ratio = torch.exp(logp.detach() - old_logp)
    for key, value in clip_fractions(ratio, adv, mask, cfg.epsilon, cfg.epsilon_high).items():
        sums[key] += value * float(mask.sum())
    if cfg.beta > 0:
        sums["kl"] += float((k3_kl(logp.detach(), ref_logp) * mask).sum())
    sums["loss"] += loss.item()


# =============================================================================
# BOOKKEEPING: below this line, the run (config, data, run, main). The packed forward, the metrics, the
# probe and the dev evaluation are rl_bookkeeping.py's. Nothing there changes what a step computes.
# =============================================================================


@dataclass
class RLConfig(TrainingConfig, RLKeys):
    WHERE = "rl config"
    HELP_ORDER = tuple("""model data stage1 taxonomy output_dir chat_template_kwargs batch_size num_generations
        vote_pool max_new_tokens temperature top_k top_p max_batch_tokens quasi_label na_weight min_vote_share
        difficulty low high confidence_weighting agreement calibration_reward shuffle_rewards scale_rewards advantage
        loss_type epsilon epsilon_high beta num_iterations micro_batch_size max_steps lr min_lr_ratio warmup_steps
        weight_decay adam_beta1 adam_beta2 grad_clip gradient_checkpointing dtype lora_rank lora_alpha lora_dropout
        lora_targets lora_save_adapter device parallel seed dev_data dev_size dev_vote_size eval_every
        eval_max_new_tokens probe_size probe_every save_every resume force_resume overwrite stop_after_steps""".split())
    lr: float = default("lr", 1e-5)
    warmup_steps: int = default("warmup_steps", 0)
    adam_beta2: float = default("adam_beta2", 0.99)
    lora_rank: int = opt(0, "LoRA rank r: train low-rank adapters on lora_targets, the base frozen (and, with beta > 0, "
                         "the KL reference: no second copy of the weights); 0 = full fine-tuning", min=0)
    lora_dropout: float = opt(0.0, "dropout on the adapters' input in training (> 0: the trainer's logprobs are no "
                              "longer the sampler's)", min=0, lt=1)
    parallel: str = opt("ddp", "under torchrun: ddp (each process a full copy, gradients all-reduced) or fsdp "
                        "(FSDP2: parameters, gradients, AdamW moments and the KL reference sharded over the "
                        "processes)", choices=PARALLEL)
    save_every: int = opt(0, "steps between resumable checkpoints (0 = only the final model)", min=0)
    stop_after_steps: int = opt(0, "leave after this many steps without saving, as if killed (the resume test)", min=0)

    def __post_init__(self):
        super().__post_init__()
        if self.low > self.high:
            raise ConfigError(f"rl config: low={self.low}, high={self.high}; expected low <= high")
        if 0 < self.vote_pool < self.num_generations:
            raise ConfigError(f"rl config: vote_pool={self.vote_pool}; expected 0 or >= num_generations "
                              f"{self.num_generations} (the trained rollouts are the pool's first G)")
        if self.calibration_reward > 0 and self.confidence_weighting in ("rollout_masked", "stage1"):
            raise ConfigError(f"rl config: calibration_reward={self.calibration_reward} trains the confidence tokens; "
                              f"expected confidence_weighting live or off (RLCR: off), not "
                              f"{self.confidence_weighting}")


# Keys that may change on --resume (checkpoint.check_output_dir): evaluation, saving, stopping and placement only.
RESUME_MAY_CHANGE = TRAINER_MAY_CHANGE + ("dev_data", "dev_size", "dev_vote_size", "eval_max_new_tokens", "probe_size",
                                          "probe_every")
PATH_KEYS = ("model", "data", "stage1", "taxonomy", "output_dir", "dev_data")  # compared as absolute paths


def load_task(cfg, env):
    """The taxonomy, tokenizer and users of a run, and the Stage-1 confidences when an option reads them
    (users without one are left out: Stage 1 left out users no teacher answer parsed)."""
    taxonomy = load_taxonomy(cfg.taxonomy or None)
    tokenizer = load_tokenizer(cfg.model)
    users = read_users(cfg.data, taxonomy=taxonomy)
    stage1 = None
    if "stage1" in (cfg.difficulty, cfg.confidence_weighting):
        stage1 = read_stage1(cfg.stage1, taxonomy)
        missing = len(users)
        users = [u for u in users if u["user_id"] in stage1]
        missing -= len(users)
        if env.main and missing:
            print(f"{cfg.stage1}: {missing} users of {cfg.data} have no Stage-1 confidence; left out", flush=True)
    if len(users) < cfg.batch_size:
        raise ValueError(f"{cfg.data}: {len(users)} users; expected at least batch_size={cfg.batch_size}")
    if env.main:
        print(f"data: {len(users)} users, {cfg.batch_size} x {cfg.num_generations} rollouts per step", flush=True)
    return Task(tokenizer, taxonomy, stop_ids_for(tokenizer), stage1, cfg.chat_template_kwargs), users


def dev_vote(cfg, env, task):
    """A measure: the quasi labels of phases 1-3 on the first dev_vote_size labelled dev users, scored
    against their gold labels (rl_bookkeeping.quasi_label_accuracy), at each dev evaluation."""
    every = cfg.eval_every if cfg.dev_data and cfg.dev_vote_size else 0  # the same on every rank
    users = (read_users(cfg.dev_data, require_labels=True, taxonomy=task.taxonomy)[: cfg.dev_vote_size]
             if every and env.main else [])  # rank 0 measures; the others only meet it at the barrier
    prompts = [task.render(u) for u in users]

    def measure(model):  # its own generator: the training steps' rollouts do not move
        generator = torch.Generator().manual_seed(cfg.seed)
        groups = sample_groups(model, prompts, cfg, generator, task.stop_ids, gathered=True)
        quasi = [quasi_labels([a.parsed for a in read_rollouts(g, task)], task.taxonomy, cfg.quasi_label,
                              cfg.na_weight) for g in groups]
        return {"dev_quasi_acc": quasi_label_accuracy(quasi, [u["labels"] for u in users])}
    return gathered(env, every, cfg.max_steps, measure, at_start=True)


def run(cfg, env, made_by=None):
    """Stage 2 on cfg.data from cfg.model; the final checkpoint goes to cfg.output_dir."""
    torch.manual_seed(cfg.seed)
    task, users = load_task(cfg, env)
    model = build_policy(cfg, env.device)
    ref_model = build_reference(cfg, model, env.device) if cfg.beta > 0 else None  # beta = 0: none loaded
    watch = measures(cfg, env, task, users, model) + [dev_vote(cfg, env, task)]
    shard(cfg, env, model, ref_model)
    announce(cfg, env, model, "rl_config.json", made_by)

    def step(model, optimizer, index, lr, generator):
        return grpo_step(model, ref_model, optimizer, users_of_step(users, index, cfg, env), task, cfg, generator, lr)
    t0 = time.time()
    done = train(cfg, model, step, cfg.max_steps, watch, env, made_by, short=SHORT, name="grpo")
    return finish(cfg, env, model, done, cfg.max_steps, t0)


def main(argv=None):
    cfg, env = start(RLConfig, argv, DEFAULT_CONFIG, "rl.py", __doc__)
    try:
        if cfg.batch_size % env.world_size:
            raise ConfigError(f"batch_size {cfg.batch_size}: expected a multiple of the number of processes "
                              f"{env.world_size}")
        uses_stage1 = "stage1" in (cfg.difficulty, cfg.confidence_weighting)
        inputs = {"data": cfg.data, "stage1": cfg.stage1 if uses_stage1 else "",
                  "taxonomy": cfg.taxonomy or DEFAULT_TAXONOMY}
        with hold_output_dir(cfg, env):
            return run(cfg, env, guard_output_dir(cfg, env, PATH_KEYS, inputs, RESUME_MAY_CHANGE))
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli(main, "rl.py")
