"""
Batched sampling from a `model.Transformer` with a preallocated KV cache.

How `generate` works, in the order it happens:

1. Plan. Prompts are sorted by length (less padding) and packed into batches whose KV cache
   (rows x (longest prompt + max_new_tokens)) fits `max_batch_tokens`. A batch is a list of
   (prompt, first sample, number of samples); a prompt whose n samples alone exceed the budget is
   split into several groups (each group prefills it again).
2. Prefill, once per prompt. The distinct prompts of a batch are RIGHT-padded to a common length and
   run through a small cache of their own (in position chunks, to bound activation memory). A
   token at position p always lives in cache slot p (model.KVCache), so a causal "slot <= position"
   mask is all the masking ragged prompts need: the pads of a short prompt sit in slots after its
   real tokens, no real token can see them, and its decode steps overwrite them one by one. Only
   the last real token's logits are kept.
3. Prefix sharing. The prompt cache becomes the shared prefix of a model.PrefixSharedCache: each
   prompt's keys/values stay ONE copy, read once per decode step for all its n rows, and each row
   gets a cache of its own for the tokens it generates. Each prompt's last-token logits are repeated
   n times; every row then draws its own first token.
4. Decode. One token per row per step; each row attends to its prompt and to its own tokens so far,
   under one softmax (exactly as if the prompt had been copied into the row). A step (decode_step)
   is the model forward, the draw and the bookkeeping, all on the device; the host reads it only every
   `sync_every` steps (1 on CPU, 16 on GPU). Rows stop on any of `stop_ids` (finish_reason "stop",
   the stop token is kept in the sample) or after `max_new_tokens` ("length"). Finished rows ride
   along (outputs ignored) until, at a read, a quarter of the batch has finished; then the cache keeps
   only the running rows (COMPACT_AT; the prompts stay). The loop ends at the first read that finds
   every row finished.

On CPU in float32 the whole call runs the model's Linear layers through oneDNN on weights packed
once on entry (onednn_linears; docs/benchmarks.md). Given a torch.compile'd model, the decode
step itself is compiled as ONE graph, forward and sampler together (with mode="reduce-overhead", one
CUDA graph per step), on fixed shapes (model.PrefixSharedCache, static): every row decodes to the end,
and the buffers and the compiled step are kept for the next batch of the same shape (StaticDecode).
Prefill stays eager.

Sampling: temperature T (T = 0 is greedy), then top-k, then top-p (nucleus), then one categorical
draw by inverse CDF with one uniform number per row per step, drawn from the seeded `torch.Generator`
outside the step, so runs are reproducible on a given device, batch plan and sync_every, and the
compiled step draws what eager decoding draws (it hands the rows that eager decoding would still run
the same numbers). Greedy decoding given the prompts' tokenizer writes a stated confidence as its most
probable VALUE 1..10, not token by token (SamplingParams.confidence; the section "A stated confidence
read as a value"); sampling never does.

Logprobs: each sampled token's logprob is log softmax(logits / T) — the tempered distribution
BEFORE top-k / top-p truncation (T = 0 is treated as T = 1). That is exactly what the GRPO trainer
recomputes from a full teacher-forced forward with `token_logprobs`, the one function both use, so
old-policy and new-policy logprobs are comparable. (Truncation is a sampling filter, not part of the
policy whose gradient we take.)

This file is the sampler library (rl.py, predict.py and label.py import it); it has no command line.
The CLIs built on it, profiling users with a checkpoint or the simulated teacher and sampling any chat
prompts, are label.py's.
"""
import contextlib
import dataclasses
import functools
import inspect
import math
import os
import weakref

import torch
import torch.nn.functional as F

from common import Progress
from confprofile import ends_before_confidence
from model import PrefixSharedCache

# KV-cache slots per batch (rows x (prompt + new tokens)). CPU: 64k (SmolLM2-135M: 3 GB fp32; more rows
# do not run faster there). GPU: 128k (Qwen3-8B bf16: 19 GB); lower it for bigger models.
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 1 << 16, "cuda": 1 << 17}
PREFILL_CHUNK_TOKENS = 8192  # prompt tokens per prefill forward (bounds activation memory)
NUCLEUS_PROBE = 256  # top-p looks for its nucleus among this many most likely tokens before a full sort
COMPACT_AT = 0.75  # drop finished rows from the decode batch once at most this share of it still runs
# Decode steps between the host's reads of the device (rows still running: stop early, drop finished rows).
# CPU: every step (eager decoding, where a read costs nothing). GPU: a read stalls the host until the GPU
# has caught up, so it could not queue the next steps meanwhile.
DEFAULT_SYNC_EVERY = {"cpu": 1, "cuda": 16}
PREFIX_BUCKET = 128  # a compiled decode's prompt cache is rounded up to this many slots (one shape for nearby lengths)
# How greedy decoding reads a stated confidence: "value" = the most probable value 1..10 (read_value),
# "expected" = the value nearest its expectation, "token" = token by token like any other text.
CONFIDENCE_DECODING = ("value", "expected", "token")
CONFIDENCE_TAIL_TOKENS = 24  # the completion's last tokens decoded to see whether a confidence value starts next


@dataclasses.dataclass
class SamplingParams:
    """How generate() samples, as one value that travels from a config to the decode loop."""
    max_new_tokens: int = 256    # new tokens per sample at most
    temperature: float = 1.0     # 0 = greedy
    top_k: int = 0               # sample from the k most likely tokens (0 = all)
    top_p: float = 1.0           # nucleus: the smallest set of most likely tokens with this mass (1 = all)
    stop_ids: tuple = ()         # a sample ends on any of these (the stop token is kept)
    max_batch_tokens: int = 0    # KV-cache slots per batch, rows x (prompt + max_new_tokens); 0 = the device's default
    sync_every: int = 0          # decode steps between the host's checks for finished rows; 0 = the device's default
    confidence: str = "value"    # greedy: a stated confidence is decoded as a value 1..10 ("value", given the
                                 # tokenizer: generate(..., tokenizer=)) or token by token ("token"); see read_value

    def check(self):
        """Raise ValueError naming the first setting that is out of range (before any work is done)."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an integer >= 1, got {self.max_new_tokens!r}")
        check_sampling(self.temperature, self.top_k, self.top_p)
        if isinstance(self.max_batch_tokens, bool) or not isinstance(self.max_batch_tokens, int) or self.max_batch_tokens < 0:
            raise ValueError(f"max_batch_tokens: expected an integer >= 0 (0 = the device's default), "
                             f"got {self.max_batch_tokens!r}")
        if isinstance(self.sync_every, bool) or not isinstance(self.sync_every, int) or self.sync_every < 0:
            raise ValueError(f"sync_every: expected an integer >= 0 (0 = the device's default), got {self.sync_every!r}")
        if self.confidence not in CONFIDENCE_DECODING:
            raise ValueError(f"confidence: expected one of {', '.join(CONFIDENCE_DECODING)}, got {self.confidence!r}")
        return self


@dataclasses.dataclass
class Sample:
    tokens: list  # completion token ids, incl. the stop token when finish_reason == "stop"
    logprobs: list  # one per token: log softmax(logits / T) of the token (see module docstring)
    finish_reason: str  # "stop" | "length"


# -----------------------------------------------------------------------------
# Sampling math: small pure functions on logits [B, V]


def token_logprobs(logits, tokens, temperature=1.0):
    """Per-token logprob under the tempered distribution: log softmax(logits / T)[token]; T = 0 -> T = 1.

    logits [..., V], tokens [...] -> [...] float32. The ONE logprob function: the sampler records it
    and the GRPO trainer recomputes it from a teacher-forced forward (differentiable).
    """
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def top_k_filter(logits, k):
    """Keep the k largest logits per row (ties with the k-th kept), the rest -inf. k <= 0: no-op."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def nucleus_mask(sorted_logits, p, log_z=None):
    """Top-p on logits sorted in descending order: True where a token falls outside the smallest set of
    most likely tokens whose probability mass reaches p (the most likely token is always kept).

    The mass is of softmax(sorted_logits), or, given log_z (the log-normaliser of the whole vocabulary,
    [B]), of exp(logit - log_z): the candidates may then be only the head of the vocabulary."""
    probs = torch.softmax(sorted_logits, dim=-1) if log_z is None else torch.exp(sorted_logits - log_z[:, None])
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    return mass_before >= p


def top_p_filter(logits, p):
    """Nucleus: keep the smallest set of most likely tokens whose probability mass reaches p. p >= 1: no-op."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool).scatter(-1, order, nucleus_mask(sorted_logits, p))
    return logits.masked_fill(drop, float("-inf"))


def nucleus_probe(logits, p, probe=NUCLEUS_PROBE):
    """The `probe` most likely logits per row (sorted, with their token ids), the vocabulary's
    log-normaliser [B], and whether those tokens hold mass >= p in every row ([] bool): then every row's
    top-p nucleus is among them."""
    top, index = torch.topk(logits, probe, dim=-1)
    log_z = torch.logsumexp(logits, dim=-1)
    fits = (torch.exp(top - log_z[:, None]).sum(dim=-1) >= p).all()
    return top, index, log_z, fits


def nucleus_candidates(logits, p, probe=NUCLEUS_PROBE):
    """Logits sorted in descending order (with their token ids, and the log-normaliser to measure the
    nucleus with, or None) that contain every row's top-p nucleus.

    A full sort of a 50k-150k vocabulary is slow on CPU; an LLM's nucleus is almost always inside its
    few hundred most likely tokens, so try those first (exact: used only if they hold mass >= p in
    every row) and sort everything only otherwise. The choice reads a value on the host: not for a
    compiled step (sample_tokens(..., graph=True) computes both and picks on the device).
    """
    if probe < logits.size(-1):
        top, index, log_z, fits = nucleus_probe(logits, p, probe)
        if bool(fits):
            return top, index, log_z
    return *torch.sort(logits, dim=-1, descending=True), None


def _first_above(cdf, u):
    """Per row, the first index i with cdf[i] > u, never past the last index that adds mass (u drawn
    below the total can still round up to it, and trailing zero-probability entries must not win)."""
    index = torch.searchsorted(cdf, u, right=True)
    return torch.minimum(index, torch.searchsorted(cdf, cdf[..., -1:].contiguous(), right=False))


def uniforms(rows, generator, device):
    """The one uniform number per row that a draw consumes, U(0, 1) [rows, 1] from `generator`."""
    return torch.rand(rows, 1, generator=generator, device=device)


def sample_categorical(logits, generator=None, u=None):
    """One draw per row from softmax(logits) by inverse CDF: the first index whose cumulative
    probability exceeds u ~ U(0, total). Tokens at -inf (probability 0) are never drawn.

    One random number per row (on CPU torch.multinomial, and Gumbel noise for every vocabulary entry,
    are much slower); no host sync on GPU. The CDF is walked in two levels, because a cumsum over
    the whole vocabulary is one long sequential pass (as slow as the softmax itself): sum blocks of
    ~sqrt(V) probabilities, pick the block whose cumulative mass exceeds u, then the token by a cumsum
    inside that block only. Same distribution; only the summation order differs. `u` [B, 1] (from
    `uniforms`) are the row's U(0, 1) numbers; without them they are drawn from `generator`.

    Returns (index [B], log_z [B]) with log_z = logsumexp(logits), free from the same softmax: its
    largest probability is exp(max - log_z) = 1 / sum exp(logits - max). (torch.logsumexp would run a
    second, slower exp over the whole row.)
    """
    probs = torch.softmax(logits, dim=-1)
    rows, vocab = probs.shape
    block = 1 << round(math.log2(vocab) / 2)
    pad = -vocab % block
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(rows, -1, block)
    block_cdf = blocks.sum(dim=-1).cumsum_(dim=-1)                          # [B, V / block]
    u = (uniforms(rows, generator, probs.device) if u is None else u) * block_cdf[:, -1:]
    b = _first_above(block_cdf, u)                                          # [B, 1]
    inside = blocks[torch.arange(rows, device=probs.device), b.squeeze(1)].cumsum_(dim=-1)  # [B, block]
    j = _first_above(inside, u - (block_cdf.gather(1, b) - inside[:, -1:]))  # u minus the mass before block b
    log_z = logits.amax(dim=-1) - probs.amax(dim=-1).log()
    return (b * block + j).squeeze(1), log_z


def check_sampling(temperature, top_k, top_p):
    """The sampler's settings, checked before any work: temperature a finite number >= 0 (0 = greedy),
    top_k an integer >= 0 (0 = all), top_p in (0, 1] (1 = all). Raises ValueError naming the setting."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an integer >= 0 (0 = all tokens), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:  # NaN fails too
        raise ValueError(f"top_p: expected a number in (0, 1] (1 = all tokens), got {top_p!r}")


def _draw_candidates(candidates, index, log_z, top_p, u):
    """A draw among sorted candidate logits (token ids `index`) after the top-p cut (measured with
    log_z, see nucleus_mask) -> token ids [B]."""
    if top_p < 1.0:
        candidates = candidates.masked_fill(nucleus_mask(candidates, top_p, log_z), float("-inf"))
    choice, _ = sample_categorical(candidates, u=u)
    return index.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def sample_tokens(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, u=None, graph=False):
    """One token per row: greedy when temperature == 0, else temperature -> top-k -> top-p -> categorical.

    Same distribution as top_p_filter(top_k_filter(logits / T, k), p) followed by a softmax draw
    (up to exact ties at the k-th logit), computed the cheap way: with top-k only the k best
    candidates (sorted) are kept and top-p works on their distribution; top-p alone looks for its
    nucleus among the most likely tokens first (nucleus_candidates); the draw is sample_categorical
    with the rows' uniforms `u` [B, 1] (default: drawn from `generator`; greedy draws none).
    graph=True: no value goes to the host (for a compiled step): top-p alone computes both the probe's
    and the full sort's draw and picks on the device what nucleus_candidates would have picked.
    Returns (tokens [B], logprobs [B]); logprobs = token_logprobs (see there: before truncation), taken
    from the draw's own normaliser when nothing was truncated (one exp pass over the vocabulary, not two).
    """
    logits = logits.float()
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
        return tokens, token_logprobs(logits, tokens, 0.0)
    scaled = logits / temperature if temperature != 1.0 else logits
    if u is None:
        u = uniforms(scaled.size(0), generator, scaled.device)
    vocab = scaled.size(-1)
    if 0 < top_k < vocab:  # top-p, if any, on the distribution of the k best
        tokens = _draw_candidates(*torch.topk(scaled, top_k, dim=-1), None, top_p, u)  # sorted, descending
    elif top_p < 1.0 and graph and NUCLEUS_PROBE < vocab:
        top, index, log_z, fits = nucleus_probe(scaled, top_p)
        tokens = torch.where(fits, _draw_candidates(top, index, log_z, top_p, u),
                             _draw_candidates(*torch.sort(scaled, dim=-1, descending=True), None, top_p, u))
    elif top_p < 1.0:
        tokens = _draw_candidates(*nucleus_candidates(scaled, top_p), top_p, u)
    else:  # drawn from the whole tempered distribution: its normaliser is the logprob's
        choice, log_z = sample_categorical(scaled, u=u)
        return choice, scaled.gather(-1, choice.unsqueeze(-1)).squeeze(-1) - log_z
    return tokens, token_logprobs(scaled, tokens, 1.0)  # scaled is already logits / T


# -----------------------------------------------------------------------------
# A stated confidence read as a value (greedy decoding only)
#
# Where a tokenizer writes numbers digit by digit (SmolLM2, Qwen3, Llama-3 up to three digits), the token
# "1" begins both 1 and 10 and carries the probability of both: a student whose confidences are spread
# over 1..10 gives "1" about twice any other digit, and token-by-token greedy decoding then writes 1 or
# 10 on every answer. Greedy decoding therefore decides a stated confidence as a VALUE: where the text
# ends with a key the parser reads as the confidence and its colon (confprofile.ends_before_confidence)
# and the most likely token begins a value 1..10, it writes the tokens of the most probable value
# (value_probabilities, read_value), then a token that ends the number. Sampling is not touched.


@dataclasses.dataclass(frozen=True)
class ConfidenceValues:
    """What greedy decoding needs from a tokenizer to read a stated confidence as a value (confidence_values)."""
    values: tuple         # values[v - 1]: the token ids that write v, for v = 1..10
    continues: tuple      # ids of the tokens that continue a number (their text starts with a digit 0-9)
    may_precede: frozenset  # ids whose text ends with ":" or is whitespace: a value may start after them
    decode: object        # token ids -> text (the tokenizer's decode)


_CONFIDENCE_VALUES = weakref.WeakKeyDictionary()  # tokenizer -> its ConfidenceValues (derived once)


def confidence_values(tokenizer):
    """A tokenizer's ConfidenceValues, derived once per tokenizer: each value's own token ids
    (tokenizer.encode("7")), and which tokens continue a number or may precede one. None when some value
    1..10 does not decode back from its tokens (greedy decoding then reads it token by token)."""
    try:
        return _CONFIDENCE_VALUES[tokenizer]
    except (KeyError, TypeError):
        pass
    values = tuple(tuple(tokenizer.encode(str(v), add_special_tokens=False)) for v in range(1, 11))
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    digits = "0123456789"
    found = None
    if all(t and tokenizer.decode(list(t)) == str(v) and texts[t[0]][:1] in digits
           for v, t in enumerate(values, 1) if max(t, default=len(texts)) < len(texts)):
        found = ConfidenceValues(
            values, tuple(i for i, t in enumerate(texts) if t[:1] and t[0] in digits),
            frozenset(i for i, t in enumerate(texts) if t and (not t.strip(" \t\n\r") or t.rstrip(" \t\n\r")[-1] == ":")),
            tokenizer.decode)
    try:
        _CONFIDENCE_VALUES[tokenizer] = found
    except TypeError:  # not weak-referenceable: derived again next time
        pass
    return found


def value_prefixes(values):
    """The token prefixes whose next-token distribution the value probabilities need: every proper
    prefix (of one token or more) of a value's tokens, shortest first. Digit by digit: (("1",)) only;
    where "10" is one token: none."""
    return sorted({t[:j] for t in values for j in range(1, len(t))}, key=lambda u: (len(u), u))


def value_probabilities(first, after, values, continues):
    """The probability of each stated value 1..10 where the number starts:

        P(v) = P(t_1) · Π_{j=2..k} P(t_j | t_1..t_{j-1}) · [P(end | t_1..t_k) if t_1..t_k begins another value]
        P(end | u) = 1 - Σ_{t continues a number} P(t | u)

    over the tokens t_1..t_k that write v. Digit by digit: P(10) = P("1") · P("0" | "1"),
    P(1) = P("1") · P(end | "1"); a one-token value is the probability of its token.
    first: probabilities [V] at the start (a list or tensor); after: {prefix: probabilities [V] after it}
    for the prefixes of value_prefixes(values) that were looked at; continues: token ids that continue a
    number. Returns [P(1), ..., P(10)], None for a value whose prefix was not looked at."""
    out, prefixes = [], set(value_prefixes(values))
    for t in values:
        if any(t[:j] not in after for j in range(1, len(t) + (t in prefixes))):
            out.append(None)  # a prefix it needs was not looked at
            continue
        p = float(first[t[0]])
        for j in range(1, len(t)):
            p *= float(after[t[:j]][t[j]])
        if t in after:  # t begins another value: the number must end here
            p *= 1.0 - sum(float(after[t][c]) for c in continues)
        out.append(p)
    return out


def read_value(probabilities, how="value"):
    """The value greedy decoding writes, from value_probabilities' [P(1), ..., P(10)] (None: not looked at):
    "value", the most probable (ties to the lower); "expected", the value nearest Σ v·P(v) / Σ P(v),
    rounded half up as confprofile.parse_confidence rounds."""
    known = [(p, v) for v, p in enumerate(probabilities, 1) if p is not None]
    if how == "expected":
        total = sum(p for p, _ in known)
        return min(10, max(1, int(math.floor(sum(p * v for p, v in known) / total + 0.5)))) if total > 0 else max(known)[1]
    best = max(p for p, _ in known)
    return min(v for p, v in known if p == best)


class ValueReader:
    """One batch's greedy decoding of stated confidences as values (see the section's comment), on the
    host, row by row; choose() runs in each decode step between the argmax and record_tokens. Per output
    row: its tokens so far, whether the text now ends where a confidence starts (armed), the value's
    remaining tokens to write (forced), and whether the next token must end the number (close)."""

    def __init__(self, cv, how, rows, vocab, device):
        self.cv, self.how = cv, how
        self.prefixes = value_prefixes(cv.values)
        self.leaves = [v for v, t in enumerate(cv.values) if len(t) == 1 and t not in self.prefixes]
        self.first = {t[0] for t in cv.values}
        self.continues = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.continues[[i for i in cv.continues if i < vocab]] = True
        self.history = [[] for _ in range(rows)]
        self.armed, self.close = [False] * rows, [False] * rows
        self.forced = [[] for _ in range(rows)]

    def choose(self, model, state, cache, logits, token, logprob):
        """The tokens [R] (and logprobs) to record this step: the argmax, except in a confidence."""
        live, running, chosen = state.live.tolist(), state.running.tolist(), token.tolist()
        change, deciding = {}, []
        for r, row in enumerate(live):
            if not running[r]:
                continue
            if self.forced[row]:
                change[r] = self.forced[row].pop(0)
                self.close[row] = not self.forced[row]
            elif self.close[row]:  # the value's tokens are written: the number ends here
                self.close[row] = False
                if self.continues[chosen[r]]:
                    change[r] = int(logits[r].masked_fill(self.continues, float("-inf")).argmax())
            elif self.armed[row] and chosen[r] in self.first:
                deciding.append(r)
        for r, value in zip(deciding, self._decide(model, state, cache, logits, deciding)):
            tokens = self.cv.values[value - 1]
            change[r], self.forced[live[r]], self.close[live[r]] = tokens[0], list(tokens[1:]), len(tokens) == 1
        if change:
            at = torch.tensor(list(change), device=token.device)
            new = torch.tensor(list(change.values()), device=token.device)
            token, logprob = token.index_put((at,), new), logprob.index_put((at,), token_logprobs(logits[at], new))
            chosen = token.tolist()
        for r, row in enumerate(live):
            if running[r]:
                self.history[row].append(chosen[r])
                self.armed[row] = (chosen[r] in self.cv.may_precede and
                                   ends_before_confidence(self.cv.decode(self.history[row][-CONFIDENCE_TAIL_TOKENS:])))
        return token, logprob

    def _decide(self, model, state, cache, logits, rows):
        """The value each decode row of `rows` writes. A prefix ("1" digit by digit) is looked at (the
        model run one token ahead on a copy of those rows' cache) only where it could matter: with
        "value", where its probability exceeds every one-token value's; with "expected", always."""
        if not rows:
            return []
        first = torch.softmax(logits[rows].double(), dim=-1).cpu()
        after = [{} for _ in rows]
        mass = [{(): 1.0} for _ in rows]
        best_leaf = [max((float(first[i, self.cv.values[v][0]]) for v in self.leaves), default=0.0)
                     for i in range(len(rows))]
        for u in self.prefixes:
            look = []
            for i in range(len(rows)):
                if u[:-1] not in mass[i]:
                    continue
                m = mass[i][u[:-1]] * float((first[i] if len(u) == 1 else after[i][u[:-1]])[u[-1]])
                room = int(state.step) + len(u) < state.out_tokens.shape[1]  # the look-ahead stays in the cache
                if room and (self.how == "expected" or m > best_leaf[i]):
                    mass[i][u] = m
                    look.append(i)
            if look:
                for i, dist in zip(look, self._look_ahead(model, state, cache, [rows[i] for i in look], u)):
                    after[i][u] = dist
        return [read_value(value_probabilities(first[i], after[i], self.cv.values, self.cv.continues), self.how)
                for i in range(len(rows))]

    @staticmethod
    def _look_ahead(model, state, cache, rows, prefix):
        """Next-token probabilities [n, V] of decode rows `rows` after writing `prefix` where the value
        starts, from a copy of their cache (the batch's own cache and state are not touched)."""
        keep = torch.tensor(rows, device=state.positions.device)
        small, positions = cache.select_rows(keep), state.positions[keep]
        for j, t in enumerate(prefix):
            ids = torch.full((len(rows), 1), t, dtype=torch.long, device=keep.device)
            logits = model(ids, (positions + j)[:, None], small)[:, -1]
        return torch.softmax(logits.double(), dim=-1).cpu()


def value_reader(sampling, cv, rows, vocab, device):
    """The batch's ValueReader when greedy decoding reads confidences as values, else None (sampling,
    confidence "token", or no ConfidenceValues)."""
    if sampling.temperature > 0 or sampling.confidence == "token" or cv is None:
        return None
    return ValueReader(cv, sampling.confidence, rows, vocab, device)


# -----------------------------------------------------------------------------
# Batch planning


def plan_batches(lengths, n, max_new_tokens, max_batch_tokens):
    """Pack prompts into batches whose KV cache, rows x (longest prompt + max_new_tokens), fits the budget.

    Returns a list of batches; a batch is a list of (prompt_index, first_sample, n_samples). Prompts
    go in ascending length so a batch pads little. A prompt whose n rows alone do not fit is split
    into groups of as many rows as fit (at least one), each group a batch of its own.
    """
    batches, current, current_rows, current_len = [], [], 0, 0
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        row_cost = lengths[i] + max_new_tokens
        if n * row_cost > max_batch_tokens:  # too big alone: groups of as many rows as fit
            per_group = max(1, max_batch_tokens // row_cost)
            for first in range(0, n, per_group):
                batches.append([(i, first, min(per_group, n - first))])
            continue
        new_len = max(current_len, row_cost)
        if current and (current_rows + n) * new_len > max_batch_tokens:
            batches.append(current)
            current, current_rows, new_len = [], 0, row_cost
        current.append((i, 0, n))
        current_rows, current_len = current_rows + n, new_len
    if current:
        batches.append(current)
    return batches


# -----------------------------------------------------------------------------
# The engine


def _model_device(model):
    return next(model.parameters()).device


@contextlib.contextmanager
def onednn_linears(model):
    """On CPU in float32: run the model's nn.Linear layers through oneDNN on weights packed once per call.

    torch's fp32 F.linear on CPU is MKL's GEMM. At decode shapes (64 rows x 256-768 features, each
    weight read once per step) oneDNN on a weight reordered once into its blocked layout is faster than
    MKL's GEMM, plain or prepacked (docs/benchmarks.md, "Sampler vs transformers"). These are the ops torch.compile's CPU backend uses
    for frozen Linear layers (torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise); the result
    differs from F.linear by summation order only (about 1e-6 relative). Costs one packed copy of the
    weights while it is active. A no-op elsewhere (GPU, bf16, a torch without mkldnn, a torch.compile'd
    model, which the compiler packs itself): the model runs as it is.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    usable = (not hasattr(model, "_orig_mod") and _model_device(model).type == "cpu"
              and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_linear_pointwise")
              and all(m.weight.dtype == torch.float32 for m in linears))
    patched = []
    try:
        if usable:
            for m in linears:  # an instance attribute `forward` shadows nn.Linear.forward (hooks still run)
                packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None)
                m.forward = functools.partial(_onednn_linear, packed, m.bias)
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


def _onednn_linear(packed_weight, bias, x):
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def prefill(model, prompts, cache, chunk_tokens=PREFILL_CHUNK_TOKENS):
    """Run right-padded prompts through the model once, filling `cache` rows 0..P-1 (slot = position).

    Returns each prompt's last-token logits [P, V]. Two things keep this cheap for big vocabularies
    and long prompts: the vocabulary projection runs only on one position per prompt (the model's
    logits_at), and the prompts go in chunks of positions, at most `chunk_tokens` tokens per forward,
    which the cache makes exact (a query attends to every earlier slot).
    """
    device = _model_device(model)
    n_prompts, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(n_prompts, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
    ids = ids.to(device)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    rows = torch.arange(n_prompts, device=device)
    chunk = max(1, chunk_tokens // n_prompts)
    last_logits = None
    for start in range(0, width, chunk):
        stop = min(width, start + chunk)
        pick = (last - start).clamp(0, stop - start - 1)  # each row's last token if it is in this chunk
        positions = torch.arange(start, stop, device=device).expand(n_prompts, stop - start)
        logits = model(ids[:, start:stop], positions, cache, logits_at=(rows, pick))  # [P, V]
        in_chunk = ((last >= start) & (last < stop))[:, None]
        last_logits = logits if last_logits is None else torch.where(in_chunk, logits, last_logits)
    return last_logits


@torch.inference_mode()
def generate(model, prompts, sampling, n=1, generator=None, seed=None, progress=False, tokenizer=None):
    """Sample n completions for each token-id prompt as `sampling` (SamplingParams) says; returns
    [prompt_index][sample_index] -> Sample.

    `tokenizer` (the prompts' own): greedy decoding (temperature 0) reads each stated confidence as a
    value (sampling.confidence; ConfidenceValues); without it, token by token. Sampling never uses it.

    See the module docstring for the algorithm. `generator` (a torch.Generator on the model's device)
    wins over `seed`; with neither, a fresh random seed is drawn. Results are reproducible for the same
    seed, prompts, settings (max_batch_tokens and sync_every too) and device, and the same whether the
    model is torch.compile'd or not (up to the last bits of the logits).
    """
    try:
        sampling.check()
    except ValueError as e:
        raise ValueError(f"generate: {e}") from None
    if n < 1:
        raise ValueError(f"generate: n must be >= 1, got n={n}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token")
    if sampling.temperature <= 0 and n > 1:  # greedy samples of one prompt are identical: decode one row each
        return [[dataclasses.replace(s, tokens=list(s.tokens), logprobs=list(s.logprobs))
                 for _ in range(n) for s in group]
                for group in generate(model, prompts, sampling, 1, generator, seed, progress, tokenizer)]
    device = _model_device(model)
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    results = [[None] * n for _ in prompts]
    budget = sampling.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS.get(device.type, DEFAULT_MAX_BATCH_TOKENS["cuda"])
    batches = plan_batches([len(p) for p in prompts], n, sampling.max_new_tokens, budget)
    cv = confidence_values(tokenizer) if tokenizer is not None and sampling.temperature <= 0 else None
    # counts generated tokens; the total (every row to max_new_tokens) shrinks as rows stop
    bar = Progress(len(prompts) * n * sampling.max_new_tokens, "generate", "tok", disable=not progress)
    with onednn_linears(model):  # CPU fp32: the weights packed once for all batches
        for batch in batches:
            samples = _generate_batch(model, [prompts[i] for i, _, _ in batch], [c for _, _, c in batch], sampling,
                                      generator, bar, cv)
            for (i, first, count), group in zip(batch, samples):
                results[i][first:first + count] = group
    bar.close()
    return results


# -----------------------------------------------------------------------------
# The decode step: the model, the sampler and the bookkeeping, all on the device


@dataclasses.dataclass
class DecodeState:
    """What the decode loop carries from step to step, all on the device; a step changes it in place.

    Decode rows (the rows the model runs) are the output rows (the samples) until eager decoding drops
    finished rows from its batch; `live` maps each decode row to its output row.
    """
    token: torch.Tensor         # [R] each decode row's last token, the next step's input
    positions: torch.Tensor     # [R] the position of that token
    running: torch.Tensor       # [R] bool: the row has not finished
    live: torch.Tensor          # [R] the output row of each decode row
    step: torch.Tensor          # [] the index in the completions of the token being written
    out_tokens: torch.Tensor    # [rows, max_new] the completions
    out_logprobs: torch.Tensor  # [rows, max_new] float32
    n_tokens: torch.Tensor      # [rows] tokens kept per output row (max_new until the row stops)
    stopped: torch.Tensor       # [rows] bool: the row ended on a stop id
    written: torch.Tensor       # [] tokens written by running rows so far (the progress bar's count)
    is_stop: torch.Tensor       # [vocab] bool: the stop ids

    @classmethod
    def allocate(cls, rows, max_new_tokens, vocab, device):
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)
        return cls(token=zeros(rows), positions=zeros(rows), running=zeros(rows, dtype=torch.bool),
                   live=torch.arange(rows, device=device), step=zeros(), out_tokens=zeros(rows, max_new_tokens),
                   out_logprobs=zeros(rows, max_new_tokens, dtype=torch.float32), n_tokens=zeros(rows),
                   stopped=zeros(rows, dtype=torch.bool), written=zeros(), is_stop=zeros(vocab, dtype=torch.bool))

    def start(self, positions, stop_ids):
        """A new batch: every row running from `positions` [rows], in place (a compiled step's tensors
        keep their addresses). Stop ids outside the vocabulary can never be drawn and are left out."""
        self.positions.copy_(positions)
        self.running.fill_(True)
        self.step.zero_()
        self.n_tokens.fill_(self.out_tokens.shape[1])
        self.stopped.fill_(False)
        self.written.zero_()
        vocab = self.is_stop.shape[0]
        self.is_stop.fill_(False)
        self.is_stop[[int(s) for s in stop_ids if 0 <= int(s) < vocab]] = True
        return self

    def select(self, keep):
        """The state of decode rows `keep` only (finished rows dropped); the output tensors are shared."""
        return dataclasses.replace(self, token=self.token[keep], positions=self.positions[keep],
                                   running=self.running[keep], live=self.live[keep])


def record_tokens(state, token, logprob):
    """Write each decode row's new token and its logprob at state.step, and end the rows that drew a
    stop id (the stop token is kept); no value goes to the host."""
    at = (state.live, state.step.expand_as(state.live))  # index tensors: a 0-d tensor index would be read on the host
    state.out_tokens.index_put_(at, token)
    state.out_logprobs.index_put_(at, logprob)
    hit = state.is_stop[token] & state.running
    state.written += state.running.sum()
    state.running &= ~hit
    state.stopped[state.live] |= hit
    state.n_tokens[state.live] = torch.where(hit, state.step + 1, state.n_tokens[state.live])
    state.token.copy_(token)


def decode_step(model, state, cache, u, temperature, top_k, top_p, graph=False, reader=None):
    """One decode step: the model on each row's last token, one token drawn per row with the rows'
    uniforms u [R, 1], the bookkeeping (record_tokens). No host sync; with graph=True (the sampler's
    branch-free form, see sample_tokens) it is what torch.compile captures as ONE graph. A ValueReader
    (greedy only) reads the step's tokens on the host and may replace them inside a stated confidence."""
    logits = model(state.token[:, None], state.positions[:, None], cache)[:, -1]
    state.positions += 1
    state.step += 1
    token, logprob = sample_tokens(logits, temperature, top_k, top_p, u=u, graph=graph)
    if reader is not None:
        token, logprob = reader.choose(model, state, cache, logits, token, logprob)
    record_tokens(state, token, logprob)


def graph_decode_step(sampling):
    """decode_step(model, state, cache, u) with `sampling`'s settings as constants, in its branch-free form:
    the function a compiled decode runs, captured whole by torch.compile."""
    temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p

    def step(model, state, cache, u):
        decode_step(model, state, cache, u, temperature, top_k, top_p, graph=True)
    return step


def compile_decode_step(compiled_model, sampling):
    """graph_decode_step compiled whole for one batch shape: fullgraph (a graph break is an error, not a
    silent second graph), static shapes, a compile cache of its own (a StaticDecode's shapes never change,
    and other shapes' graphs must not count towards its recompile limit; a torch without
    isolate_recompiles, before 2.13, shares one cache: torch._dynamo.config.recompile_limit shapes per
    process), CUDA graphs if `compiled_model` was compiled with them (mode="reduce-overhead")."""
    config = getattr(compiled_model, "get_compiler_config", lambda: None)() or {}  # inductor's, with the mode applied
    mode = "reduce-overhead" if config.get("triton.cudagraphs", False) else None
    isolate = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}
    return torch.compile(graph_decode_step(sampling), fullgraph=True, dynamic=False, mode=mode, **isolate)


class StaticDecode:
    """A torch.compile'd model's decode for one batch shape: fixed-shape tensors (the prompt cache,
    PrefixSharedCache(static=True), the DecodeState, the uniforms) and the compiled step. generate() keeps
    the last one per compiled model and reuses it for the next batch of the same shape (prompts prefilled
    into the same prompt cache), so every tensor the step touches keeps its address and CUDA graphs replay
    without being recorded again. The prompt cache is PREFIX_BUCKET-rounded, so prompts of nearby
    lengths share a shape. It holds one batch's KV cache until a batch of another shape replaces it."""

    def __init__(self, compiled_model, model, prompt_lengths, counts, sampling):
        device = _model_device(model)
        self.key = static_decode_key(prompt_lengths, counts, sampling)
        rows = sum(counts)
        self.prompt_cache = model.setup_cache(len(prompt_lengths), self.key[1])
        self.cache = PrefixSharedCache(self.prompt_cache, prompt_lengths, counts, sampling.max_new_tokens, static=True)
        self.state = DecodeState.allocate(rows, sampling.max_new_tokens, model.args.vocab_size, device)
        self.u = torch.zeros(rows, 1, device=device)  # the uniforms of the rows still drawing (see _generate_batch)
        for t in (*dataclasses.astuple(self.state), self.u):
            torch._dynamo.mark_static_address(t)
        self.step = compile_decode_step(compiled_model, sampling)


def static_decode_key(prompt_lengths, counts, sampling):
    """What fixes a compiled decode's shapes and graph: prompts, prompt-cache width, rows per prompt, settings."""
    width = -(-max(prompt_lengths) // PREFIX_BUCKET) * PREFIX_BUCKET
    return (len(prompt_lengths), width, tuple(counts), sampling.max_new_tokens, sampling.temperature,
            sampling.top_k, sampling.top_p)


_STATIC_DECODES = weakref.WeakKeyDictionary()  # compiled model -> its last StaticDecode


def static_decode(compiled_model, model, prompt_lengths, counts, sampling):
    """The compiled model's StaticDecode for this batch shape: the last one if it fits, else a new one."""
    fixed = _STATIC_DECODES.pop(compiled_model, None)
    if fixed is None or fixed.key != static_decode_key(prompt_lengths, counts, sampling):
        del fixed  # the old buffers are freed before the new ones are allocated: two KV caches may not fit
        fixed = StaticDecode(compiled_model, model, prompt_lengths, counts, sampling)
    _STATIC_DECODES[compiled_model] = fixed
    return fixed


def _generate_batch(model, prompts, counts, sampling, generator, bar, cv=None):
    """One planned batch: prefill each prompt once, decode counts[i] rows on it. Returns [[Sample]].

    Eager: decode_step as it is; finished rows are dropped from the decode batch (COMPACT_AT).
    torch.compile'd model: the compiled decode_step on the fixed shapes of a StaticDecode, all rows to
    the end. The host reads the device only every sync_every steps (rows still running: stop early,
    drop finished rows), and both forms draw the same uniforms: the compiled one gives the rows that
    eager decoding would still run the numbers eager decoding would give them. Greedy decoding that
    reads confidences as values (cv, value_reader) decodes eagerly: its reader runs on the host each step.
    """
    device = _model_device(model)
    max_new_tokens = sampling.max_new_tokens
    settings = (sampling.temperature, sampling.top_k, sampling.top_p)
    sync_every = sampling.sync_every or DEFAULT_SYNC_EVERY.get(device.type, DEFAULT_SYNC_EVERY["cuda"])
    lengths = [len(p) for p in prompts]
    rows = sum(counts)
    eager = getattr(model, "_orig_mod", model)  # a torch.compile'd model decodes; prefill (new shapes
    reader = value_reader(sampling, cv, rows, eager.args.vocab_size, device)  # every batch) runs eagerly
    compiled = eager is not model and reader is None
    if compiled:
        fixed = static_decode(model, eager, lengths, counts, sampling)
        last_logits = prefill(eager, prompts, fixed.prompt_cache)
        cache, state = fixed.cache, fixed.state
        cache.set_prompt_lengths(lengths)
    else:
        prompt_cache = eager.setup_cache(len(prompts), max(lengths))
        last_logits = prefill(eager, prompts, prompt_cache)
        cache = PrefixSharedCache(prompt_cache, lengths, counts, max_new_tokens)  # prompts: one copy each
        del prompt_cache
        state = DecodeState.allocate(rows, max_new_tokens, eager.args.vocab_size, device)
    row_prompt = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(counts, device=device))
    state.start(torch.tensor(lengths, device=device).index_select(0, row_prompt), sampling.stop_ids)

    drawing = torch.arange(rows, device=device)  # the rows that draw a uniform each step (see the docstring)
    u = uniforms(rows, generator, device) if sampling.temperature > 0 else None
    first = last_logits.index_select(0, row_prompt)
    token, logprob = sample_tokens(first, *settings, u=u)
    if reader is not None:  # no confidence starts at the first token: the reader only notes it
        token, logprob = reader.choose(eager, state, None, first, token, logprob)
    record_tokens(state, token, logprob)
    shown = 0  # tokens counted on the progress bar
    for i in range(1, max_new_tokens):  # the step that draws token i
        if i % sync_every == 0:  # the host reads the device: rows still running, tokens written
            n_running, written = torch.stack([state.running.sum(), state.written]).tolist()
            bar.update(written - shown)
            shown = written
            if n_running == 0:
                break
            if n_running <= COMPACT_AT * len(drawing):  # drop finished rows instead of decoding them further
                keep = state.running.nonzero().squeeze(1)
                if compiled:  # fixed shapes: every row decodes on, only the running ones draw
                    drawing = keep
                else:
                    cache, state = cache.select_rows(keep), state.select(keep)
                    drawing = state.live
        if sampling.temperature > 0:
            u = uniforms(len(drawing), generator, device)
        if compiled:
            if u is not None:
                fixed.u.index_copy_(0, drawing, u)
            torch.compiler.cudagraph_mark_step_begin()
            fixed.step(eager, state, cache, fixed.u)
        else:
            decode_step(eager, state, cache, u, *settings, reader=reader)
    bar.update(int(state.written) - shown)

    out_tokens, out_logprobs = state.out_tokens.cpu(), state.out_logprobs.cpu()
    n_tokens, stopped = state.n_tokens.tolist(), state.stopped.tolist()
    bar.total -= rows * max_new_tokens - sum(n_tokens)
    samples, row = [], 0
    for count in counts:
        group = []
        for _ in range(count):
            k = n_tokens[row]
            group.append(Sample(out_tokens[row, :k].tolist(), out_logprobs[row, :k].tolist(),
                                "stop" if stopped[row] else "length"))
            row += 1
        samples.append(group)
    return samples
