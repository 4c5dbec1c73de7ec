"""
The bookkeeping of a GRPO step (rl.py's BOOKKEEPING line): what the step needs around its formulas, and
what a run watches. Nothing here changes what a step computes; rl.py holds the algorithm.

Reads top to bottom: sampling with every parameter at hand; each rollout token's character offsets;
the packed forward (the trainer's side of the ratio: the rollouts' logprobs under the current policy,
each group's prompt run once, in micro-batches that keep sharded ranks in step); the step's metrics
(summed over processes, then normalised); the probe and the dev evaluation (greedy answers of the
policy, and the quasi labels' accuracy, measured by rank 0 with the full parameters); the data order.
"""
import contextlib
import math

import torch

from common import completion_text
from confprofile import parse_answer, read_users, stated_answers, vote
from distributed import all_reduce_sum, barrier, full_parameters, is_sharded
from evaluate import evaluate, profile_from_parse
from rollout import SamplingParams, generate, token_logprobs
from trainer import autocast_for, pad_micro_batches

# -----------------------------------------------------------------------------
# Sampling with every parameter at hand


def sample(model, prompts, sampling, n, generator, gathered=False):
    """rollout.generate(model, prompts, sampling, n) with the full parameters (FSDP2: gathered for the
    whole sampling, so each process decodes its own number of steps without collectives; `gathered`:
    the caller holds them already, as a measure under `gathered` does)."""
    with contextlib.nullcontext() if gathered else full_parameters(model):
        return generate(model, prompts, sampling, n=n, generator=generator)


# -----------------------------------------------------------------------------
# Token offsets: where each rollout token's characters end in the text the reward reads (rl.read_rollouts)


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


# -----------------------------------------------------------------------------
# The packed forward: logprobs of the rollouts under the current policy, prompt shared


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


def new_sums(local):
    """The step's metric sums, with this process's (sequences, loss tokens, trained sequences)."""
    sums = dict.fromkeys(["loss", "entropy", "kl", "clip_low", "clip_high", "clip_region", "lp_diff", "lp_tokens",
                          "lp_diff_max", "forward_tokens"], 0.0)
    sums.update(zip(("seqs", "loss_tokens", "trained_seqs"), local))  # this rank's: the metrics sum over ranks
    return sums


# A micro-batch that trains nothing: one token of a one-token prompt, outside the loss (mask 0). A rank
# with fewer micro-batches than another runs these so that every rank meets every collective.
PADDING = [([0], [{"tokens": [0], "sampler_logp": [0.0], "mask": [0], "adv": [0.0], "trained": True}])]


def even_micro_batches(model, groups, cfg):
    """micro_batches of the groups that have rows; sharded, padded to the same count on every rank."""
    batches = micro_batches([(p, rs) for p, rs in groups if rs], cfg.micro_batch_size)
    if is_sharded(model):  # every sharded forward and backward is a collective: all ranks run as many
        batches = pad_micro_batches(batches, PADDING, next(model.parameters()).device)
    return batches


def forward_micro(model, mb, cfg, sums):
    """Teacher-forced logprobs of one micro-batch [(prompt, rows)] -> (logp, loss mask, advantages),
    each [N, C]. With `sums`, also adds this forward's entropy, sampler-vs-trainer logprob gap and
    token counts to them (the first pass: the policy that sampled), unless mb is a PADDING one."""
    device = next(model.parameters()).device
    rows = [r for _, rs in mb for r in rs]
    c_max = max(len(r["tokens"]) for r in rows)
    mask = padded([r["mask"] for r in rows], c_max).to(device)
    adv = padded([r["adv"] for r in rows], c_max).to(device)
    with autocast_for(device):
        logp, entropy = completion_logprobs(model, [(p, [r["tokens"] for r in rs]) for p, rs in mb], cfg.temperature)
    if sums is not None and mb is not PADDING:
        sums["forward_tokens"] += sum(len(p) + sum(len(r["tokens"]) for r in rs) for p, rs in mb)
        sums["entropy"] += float((entropy * mask).sum())
        filled = padded([[1] * len(r["tokens"]) for r in rows], c_max).to(device).bool()
        gap = (logp.detach() - padded([r["sampler_logp"] for r in rows], c_max).to(device)).abs()[filled]
        sums["lp_diff"] += float(gap.sum())
        sums["lp_tokens"] += gap.numel()
        sums["lp_diff_max"] = max(sums["lp_diff_max"], float(gap.max()))
    return logp, mask, adv


# -----------------------------------------------------------------------------
# Metrics


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


def step_sums(groups, rewards, flat, keep, stats, sums):
    """This process's sums of one step, which step_metrics adds over the processes: rollouts, users, rewards and
    their squares, flat groups (flat [B, 1]: rl.flat_groups) of all and of the kept users, completion lengths,
    truncations, the policy update's `sums` and the Conf-Profile statistics `stats` (profile_stats)."""
    flat_rewards = rewards.flatten()
    lengths = [len(s.tokens) for g in groups for s in g]
    flat = flat.flatten().tolist()
    return {
        "rollouts_n": len(lengths), "users": len(groups), "reward_sum": float(flat_rewards.sum()),
        "reward_sq": float((flat_rewards ** 2).sum()), "zero_var_groups": sum(flat),
        "zero_var_kept": sum(f for f, k in zip(flat, keep) if k), "kept_users": sum(keep),
        "len_sum": sum(lengths), "truncated": sum(s.finish_reason == "length" for g in groups for s in g),
        **{k: v for k, v in sums.items() if k != "lp_diff_max"}, **stats,
    }


def step_metrics(groups, rewards, flat, keep, stats, sums, grad_norm, stepped, lr, cfg, t_rollout, t_train, device):
    """One step's metrics, summed over ranks then normalised. Definitions (TRL's where TRL has one):
    reward_mean / reward_std over all rollouts; zero_var_frac: groups whose rewards are all equal
    (rl.flat_groups); loss: the batch loss, mean over the num_iterations optimizer steps; entropy: mean
    over the loss tokens of every kept rollout, at the first pass (the sampling policy); clip_low /
    clip_high / clip_region and kl: mean over the loss tokens of every kept rollout and over the
    iterations (a rollout with zero advantage is never clipped); format_fail, confidence (mean stated
    confidence of the answered dimensions), conf_1_frac / conf_10_frac (shares of those confidences that
    are 1 / 10), na_rate, no_confidence (dimensions answered without a confidence), majority_ratio (share
    of the G rollouts that gave the quasi label), difficulty, kept / too_easy / too_hard (counts) and
    kept_frac / too_easy_frac / too_hard_frac (shares of the users): the Conf-Profile scores of all
    rollouts of the step; vote_flip, reward_flip: mechanism_stats."""
    t, peak = global_sums(step_sums(groups, rewards, flat, keep, stats, sums), sums["lp_diff_max"], device)
    n, per_tok, per_it_tok = max(t["rollouts_n"], 1), max(t["loss_tokens"], 1), max(t["loss_tokens"], 1) * cfg.num_iterations
    mean_r = t["reward_sum"] / n
    metrics = {
        "reward_mean": mean_r, "reward_std": math.sqrt(max(t["reward_sq"] / n - mean_r ** 2, 0.0)),
        "zero_var_frac": t["zero_var_groups"] / max(t["users"], 1),
        "completion_len": t["len_sum"] / n, "truncated_frac": t["truncated"] / n,
        "loss": t["loss"] / cfg.num_iterations if stepped else 0.0, "entropy": t["entropy"] / per_tok,
        "clip_low": t["clip_low"] / per_it_tok, "clip_high": t["clip_high"] / per_it_tok,
        "clip_region": t["clip_region"] / per_it_tok,
        "lp_diff_mean": t["lp_diff"] / max(t["lp_tokens"], 1), "lp_diff_max": peak,
        "grad_norm": grad_norm, "lr": lr, "loss_seqs": t["seqs"], "trained_seqs": t["trained_seqs"],
        "optimizer_step": int(stepped), "kept": int(t["kept_users"]),
        "rollout_s": t_rollout, "train_s": t_train, "rollout_tok_s": t["len_sum"] / max(t_rollout, 1e-9),
        "train_tok_s": t["forward_tokens"] / max(t_train, 1e-9),
        "zero_var_kept_frac": t["zero_var_kept"] / max(t["kept_users"], 1),
    }
    if "format_fail" in t:  # the Conf-Profile statistics (profile_stats)
        metrics.update(profile_metrics(t, n))
    if cfg.beta > 0:
        metrics["kl"] = t["kl"] / per_it_tok
    return metrics


def global_sums(local, peak, device):
    """The metric sums {name: number} summed over processes (in float64), and the largest of `peak`."""
    keys = sorted(local)
    t = dict(zip(keys, all_reduce_sum(torch.tensor([float(local[k]) for k in keys], dtype=torch.float64,
                                                   device=device)).tolist()))
    peak = torch.tensor([peak], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return t, float(peak)


def profile_metrics(t, n):
    """The Conf-Profile statistics (profile_stats' sums over all processes) as rates and means over n rollouts;
    with mechanism_stats' sums, vote_flip and reward_flip too."""
    users = max(t["users"], 1)
    out = {"too_easy": int(t["too_easy"]), "too_hard": int(t["too_hard"]), "format_fail": t["format_fail"] / n,
           "kept_frac": t["kept"] / users, "too_easy_frac": t["too_easy"] / users,
           "too_hard_frac": t["too_hard"] / users,
           "confidence": t["conf_sum"] / max(t["answered"], 1), "conf_1_frac": t["conf_1"] / max(t["answered"], 1),
           "conf_10_frac": t["conf_10"] / max(t["answered"], 1), "na_rate": t["na"] / max(t["answered"], 1),
           "no_confidence": t["no_confidence"] / max(t["dim_slots"], 1),
           "majority_ratio": t["majority_sum"] / max(t["majority_n"], 1),
           "difficulty": t["difficulty_sum"] / users}
    if "vote_flips" in t:
        out.update(vote_flip=t["vote_flips"] / max(t["vote_labels"], 1), reward_flip=t["reward_flips"] / n)
    return out


def profile_stats(answers, quasi, levels, counts, taxonomy):
    """The Conf-Profile statistics of one step's rollouts, as sums (step_metrics adds them over ranks):
    format failures, stated confidences (their sum; how many are 1 and 10: RLCR's collapse telltales), NA
    answers, answers without a confidence, the majority ratio (the share of all G rollouts that gave the quasi
    label), difficulty, kept / too easy / too hard."""
    dims = list(taxonomy["dimensions"])
    stats = dict.fromkeys(["format_fail", "dim_slots", "conf_sum", "answered", "conf_1", "conf_10", "na",
                           "no_confidence", "majority_sum", "majority_n", "difficulty_sum"], 0.0)
    for reads, q, level in zip(answers, quasi, levels):
        parsed = [a.parsed for a in reads]
        for p in parsed:
            stats["format_fail"] += not p["format_ok"]
            stats["dim_slots"] += len(dims)
            for answer in p["dims"].values():
                if answer is None:
                    continue
                stats["no_confidence"] += answer["confidence"] is None
                if answer["confidence"] is not None:
                    stats["answered"] += 1
                    stats["conf_sum"] += answer["confidence"]
                    stats["conf_1"] += answer["confidence"] == 1
                    stats["conf_10"] += answer["confidence"] == 10
                    stats["na"] += answer["label"] == "NA"
        stated = [stated_answers(p)["dims"] for p in parsed if p["format_ok"]]  # once per rollout, not per dimension
        for d in dims:
            if q[d] is not None:
                agreeing = sum((s[d] or {}).get("label") == q[d]["label"] for s in stated)
                stats["majority_sum"] += agreeing / len(parsed)
                stats["majority_n"] += 1
        stats["difficulty_sum"] += level
    return {**stats, **counts}


def vote_flips(parsed, taxonomy, na_weight):
    """How often confidence changes one user's quasi labels: (flips, labelled) with

        labelled = #{d : both votes give a quasi label},  flips = #{d labelled : argmax_k S^conf_k != argmax_k S^maj_k}

    S^conf_k = sum_j c_jd 1[y_jd = k] and S^maj_k = sum_j 1[y_jd = k] over the same rollouts (those that parse,
    their stated answers: rl.quasi_labels), both with the run's na_weight and confprofile.vote's ties.
    vote_flip = sum flips / sum labelled over the step's users."""
    valid = [stated_answers(p) for p in parsed if p["format_ok"]]
    if not valid:
        return 0, 0
    weighted, plain = (vote(valid, taxonomy, weighting=w, na_weight=na_weight) for w in ("confidence", "majority"))
    both = [d for d in taxonomy["dimensions"] if weighted[d] is not None and plain[d] is not None]
    return sum(weighted[d]["label"] != plain[d]["label"] for d in both), len(both)


def reward_flips(rewards, unweighted, tol=1e-9):
    """How often confidence changes a reward: #{j : |r_j - r_j^off| > tol}, r_j the step's rewards [B, G] and
    r_j^off the same rollouts' rewards with confidence_weighting="off" (w_jd = 1), same quasi labels.
    reward_flip = this count / the number of rollouts (0 under confidence_weighting=off)."""
    return int(((rewards.double() - unweighted.double()).abs() > tol).sum())


def mechanism_stats(answers, rewards, unweighted, taxonomy, na_weight):
    """The mechanism sums of one step (step_metrics adds them over ranks): vote_flips and reward_flips."""
    flips = [vote_flips([a.parsed for a in reads], taxonomy, na_weight) for reads in answers]
    return {"vote_flips": sum(f for f, _ in flips), "vote_labels": sum(n for _, n in flips),
            "reward_flips": reward_flips(rewards, unweighted)}


SHORT = {"reward_mean": "r", "reward_std": "r_sd", "zero_var_frac": "0var", "kept": "kept", "format_fail": "fmt_fail",
         "confidence": "conf", "na_rate": "na", "majority_ratio": "maj", "probe_agreement": "probe",
         "completion_len": "len", "entropy": "H", "kl": "kl", "clip_region": "clip", "grad_norm": "|g|",
         "lp_diff_max": "lp_gap", "rollout_s": "t_roll", "train_s": "t_train", "dev_avg_f1": "dev_f1",
         "dev_confidence": "dev_conf", "dev_quasi_acc": "dev_qacc"}  # the progress bar's names


# -----------------------------------------------------------------------------
# The probe and the dev evaluation


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


def quasi_label_accuracy(quasi, gold):
    """TTRL's label accuracy on labelled users: #{(u, d) : q_ud = g_ud} / #{(u, d) : q_ud exists}, q_ud the
    quasi label the vote gives user u on dimension d (None when no rollout answered d: not counted) and
    g_ud the gold label (NA included: a quasi NA on a gold NA is right). 0 when no quasi label exists."""
    pairs = [(q[d]["label"], g[d]) for q, g in zip(quasi, gold) for d in q if q[d] is not None]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


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


def gathered(env, every, last, measure, at_start=False):
    """A measure for trainer.train: every `every` steps and at the last one (and at step 0 with
    at_start), rank 0 runs measure(model) with the full parameters while the others wait."""
    def run_measure(model, done):
        if not every or not (done % every == 0 or done == last) or (done == 0 and not at_start):
            return {}
        with full_parameters(model):
            out = measure(model) if env.main else {}
        barrier()
        return out
    return run_measure


def measures(cfg, env, task, users, model):
    """The dev evaluation (greedy, labelled users; also of the starting policy) and the probe (greedy
    answers of the first training users against the starting checkpoint's, taken here, before training)."""
    eval_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
    dev_eval = probe = None
    if cfg.dev_data and env.main:
        dev_users = read_users(cfg.dev_data, require_labels=True, taxonomy=task.taxonomy)[: cfg.dev_size]
        dev_prompts = [task.render(u) for u in dev_users]
        dev_eval = lambda m: greedy_eval(m, task.tokenizer, dev_users, dev_prompts, task.taxonomy,  # noqa: E731
                                         task.stop_ids, eval_tokens)
    if cfg.probe_size and env.main:
        probe_prompts = [task.prompt(u) for u in users[: cfg.probe_size]]
        reference = greedy_answers(model, task.tokenizer, probe_prompts, task.taxonomy, task.stop_ids, eval_tokens)
        probe = lambda m: {"probe_agreement": label_agreement(greedy_answers(  # noqa: E731
            m, task.tokenizer, probe_prompts, task.taxonomy, task.stop_ids, eval_tokens), reference)}
    return [gathered(env, cfg.eval_every if cfg.dev_data else 0, cfg.max_steps, dev_eval, at_start=True),
            gathered(env, cfg.probe_every if cfg.probe_size else 0, cfg.max_steps, probe)]


# -----------------------------------------------------------------------------
# The data order


def users_of_step(users, step, cfg, env):
    """This process's users of 0-based `step`: the data order is a pure function of (seed, epoch), so the
    step number is the data position."""
    epoch, k = divmod(step, len(users) // cfg.batch_size)
    order = torch.randperm(len(users), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).tolist()
    return [users[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size][env.rank::env.world_size]]
