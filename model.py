"""
One decoder-only Transformer for the Llama-3 / Qwen2 / Qwen2.5 / Qwen3 families, built from a
Hugging Face `config.json`, reading and writing HF-named safetensors, with a preallocated KV cache
(and, for decoding several samples of each prompt, a cache that holds each prompt once).

Module names are HF's own (`model.layers.3.self_attn.q_proj`, ...), so a checkpoint's tensors load
by name with no conversion table, and RoPE is HF's rotate-half form, so q/k weights need no
permutation. Family differences are three switches in ModelArgs: q/k/v bias (Qwen2), per-head
RMSNorm of q and k (Qwen3), and llama3 rope scaling (Llama 3.1+). Every number this file computes is
checked against transformers in tests/test_model.py.
"""
import contextlib
import copy
import errno
import json
import math
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from common import atomic_write_text, fsync_dir, fsync_file, read_json, unwritable_as_data_error


SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "generation_config.json")


_REQUIRED = object()
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object",
          list: "a JSON list"}


def config_value(cfg, key, kind, default=_REQUIRED, positive=False, where=""):
    """cfg[key] checked to be of `kind` (int, float: any finite number, bool, str, dict, list) and, with
    `positive`, > 0; a missing key or a JSON null is `default` (a missing required key is an error). The
    error names config.json and the key (`where` prefixes it: "rope_parameters.")."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config.json: {where}{key}: missing; expected {_KINDS[kind]}")
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive and not value > 0:
        raise ValueError(f"config.json: {where}{key}: expected {_KINDS[kind]} > 0, got {value!r}")
    if not ok:
        raise ValueError(f"config.json: {where}{key}: expected {_KINDS[kind]}, got {json.dumps(value)[:40]}")
    return value


@dataclass
class ModelArgs:
    model_type: str = "qwen3"
    vocab_size: int = 32000
    dim: int = 256                      # hidden_size
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4                 # < n_heads: grouped-query attention
    head_dim: int = 64                  # Qwen3 may have head_dim != dim // n_heads
    intermediate_size: int = 768
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {} or {"rope_type": "llama3"|"linear", ...}
    max_position_embeddings: int = 4096
    qkv_bias: bool = False              # Qwen2 always; Llama/Qwen3 when attention_bias
    o_bias: bool = False                # Llama/Qwen3 attention_bias also puts a bias on o_proj
    mlp_bias: bool = False              # Llama mlp_bias
    qk_norm: bool = False               # Qwen3
    tie_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Read an HF config.json dict; anything we would silently get wrong is an error naming the field:
        a key we need that is missing, a value of the wrong type (`"tie_word_embeddings": "false"` is
        not false), a size that is not a positive integer, a feature we do not implement."""
        if not isinstance(cfg, dict):
            raise ValueError("config.json: expected a JSON object of model settings")
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"config.json: model_type {model_type!r} is not supported; expected one of {sorted(SUPPORTED)}")
        architectures = config_value(cfg, "architectures", list, [])
        for arch in architectures:
            if arch != SUPPORTED[model_type]:
                raise ValueError(f"config.json: architectures {arch!r} is not supported; expected {SUPPORTED[model_type]!r}")
        if config_value(cfg, "hidden_act", str, "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported; expected 'silu'")
        if config_value(cfg, "use_sliding_window", bool, False):
            raise ValueError("config.json: use_sliding_window=true is not supported; expected false")
        # transformers 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
        key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
        rope = dict(config_value(cfg, key, dict, {}))
        rope_type = config_value(rope, "rope_type", str, None, where=f"{key}.") or \
            config_value(rope, "type", str, "default", where=f"{key}.")
        partial = config_value(rope, "partial_rotary_factor", float, None, where=f"{key}.")
        partial = config_value(cfg, "partial_rotary_factor", float, 1.0) if partial is None else partial
        if partial != 1.0:
            raise ValueError(f"config.json: partial_rotary_factor {partial} is not supported; expected 1.0")
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported; expected default, llama3 or linear")
        max_positions = config_value(cfg, "max_position_embeddings", int, 4096, positive=True)
        scaling = {}
        if rope_type != "default":
            scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
            scaling["rope_type"] = rope_type
            scaling.setdefault("original_max_position_embeddings", max_positions)
            needed = ("factor",) + (("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                                    if rope_type == "llama3" else ())
            for k in needed:
                config_value(scaling, k, float, positive=True, where=f"{key}.")
            if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
                raise ValueError(f"config.json: {key}.high_freq_factor: expected more than low_freq_factor "
                                 f"{scaling['low_freq_factor']}, got {scaling['high_freq_factor']}")
        hidden = config_value(cfg, "hidden_size", int, positive=True)
        n_heads = config_value(cfg, "num_attention_heads", int, positive=True)
        n_kv_heads = config_value(cfg, "num_key_value_heads", int, None, positive=True) or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"config.json: num_key_value_heads: expected a divisor of num_attention_heads {n_heads}, "
                             f"got {n_kv_heads}")
        head_dim = config_value(cfg, "head_dim", int, None, positive=True) or hidden // n_heads
        if head_dim % 2 or not head_dim:
            derived = "" if cfg.get("head_dim") else f" (hidden_size {hidden} // num_attention_heads {n_heads})"
            raise ValueError(f"config.json: head_dim: expected an even number (RoPE rotates pairs), got {head_dim}{derived}")
        attention_bias = config_value(cfg, "attention_bias", bool, False)
        theta = config_value(rope, "rope_theta", float, None, positive=True, where=f"{key}.")
        return cls(
            model_type=model_type,
            vocab_size=config_value(cfg, "vocab_size", int, positive=True),
            dim=hidden,
            n_layers=config_value(cfg, "num_hidden_layers", int, positive=True),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            intermediate_size=config_value(cfg, "intermediate_size", int, positive=True),
            norm_eps=config_value(cfg, "rms_norm_eps", float, 1e-6, positive=True),
            rope_theta=theta if theta is not None else config_value(cfg, "rope_theta", float, 10000.0, positive=True),
            rope_scaling=scaling,
            max_position_embeddings=max_positions,
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=config_value(cfg, "mlp_bias", bool, False),
            qk_norm=model_type == "qwen3",
            tie_embeddings=config_value(cfg, "tie_word_embeddings", bool, False),
        )

    def to_hf_config(self) -> dict:
        """The config.json transformers needs to rebuild this model (for models made from scratch)."""
        if self.model_type not in SUPPORTED:
            raise ValueError(f"ModelArgs.model_type {self.model_type!r} is not supported; expected one of {sorted(SUPPORTED)}")
        if self.model_type == "qwen2" and (self.o_bias or not self.qkv_bias):
            raise ValueError("ModelArgs: qwen2 has q/k/v bias and no o_proj bias; expected qkv_bias=True, o_bias=False")
        if self.model_type != "qwen2" and self.qkv_bias != self.o_bias:
            raise ValueError(f"ModelArgs: {self.model_type} attention_bias covers q/k/v and o; expected qkv_bias == o_bias")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError(f"ModelArgs: qk_norm={self.qk_norm} does not fit model_type {self.model_type!r}")
        cfg = {
            "architectures": [SUPPORTED[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "rms_norm_eps": self.norm_eps, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": self.tie_embeddings,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default", **self.rope_scaling},
        }
        if self.model_type != "qwen2":
            cfg["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            cfg["mlp_bias"] = self.mlp_bias
        return cfg


# -----------------------------------------------------------------------------
# RoPE (HF rotate-half convention)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama-3.1 ("llama3") or linear scaling when configured."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = args.rope_scaling
    if s.get("rope_type") == "linear":
        return inv_freq / s["factor"]
    if s.get("rope_type") == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(positions, inv_freq, dtype):
    """cos/sin tables [B, T, 1, head_dim] for the given per-row positions, computed in float32."""
    freqs = positions[..., None].float() * inv_freq.float()     # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, H, D] rotated by position: x*cos + rotate_half(x)*sin, rotate_half(a, b) = (-b, a)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# -----------------------------------------------------------------------------
# KV cache


class KVCache(nn.Module):
    """Preallocated keys/values: k, v [n_layers, B, n_kv_heads, max_len, head_dim].

    Semantics of Transformer.forward(input_ids[B,T], positions[B,T], cache, attn_mask):
      * cache slot == position. Each new token's k/v is written at slot positions[b, t] of row b
        (overwriting what was there), so rows may be at different positions (ragged prompts).
      * A query at position p in row b attends to slots s <= p of row b (causal over the cache), and,
        if attn_mask[B, S] (bool, S >= the slots used, True = real token) is given, only to slots
        where attn_mask[b, s] is True. Its own slot s == p is always allowed, so a pad query never
        attends to nothing (its output is finite garbage that you ignore).
      * Attention reads only slots 0..max(positions) (the filled part); stale values in later slots
        are never seen, because a row's queries only look at slots <= their own position.
      * positions default to arange(T) on every row (a prefill from slot 0). B must equal the cache's
        batch size: row b of the input is row b of the cache.
    Ragged prompts, right-padded: prefill with positions = arange(T) on every row and no mask; row b's
    next-token logits are at index len_b - 1; then decode row b at position len_b, len_b + 1, ...
    (its pad slots get overwritten before any query can see them). Left padding also works: give
    attn_mask False on the pad slots (RoPE is relative, so the shift does not change the result).
    Prefix sharing: decode the samples of prefilled prompts on a PrefixSharedCache built from it (one
    copy of each prompt for all its samples).
    """

    def __init__(self, n_layers, batch_size, max_len, n_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
        super().__init__()
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    def update(self, layer, positions, k, v):
        """Write k, v [B, T, n_kv_heads, head_dim] at slots `positions` [B, T] of each row."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[layer][rows, :, positions] = k
        self.v[layer][rows, :, positions] = v

    def attention_mask(self, positions, attn_mask=None):
        """The bool mask [B, 1, T, S] of the semantics above, S = max(positions) + 1; built once per forward."""
        S = int(positions.max()) + 1
        if S > self.max_len:
            raise ValueError(f"KVCache: position {S - 1} does not fit max_len {self.max_len}")
        slots = torch.arange(S, device=positions.device)
        mask = slots <= positions[:, :, None]                                      # [B, T, S]
        if attn_mask is not None:
            mask = mask & (attn_mask[:, None, :S] | (slots == positions[:, :, None]))
        return mask[:, None]

    def attend(self, layer, q, k, v, positions, mask):
        """Store k, v [B, T, n_kv, D] of the new tokens, then attention of q [B, T, H, D] over the filled
        slots -> [B, H, T, D]."""
        self.update(layer, positions, k, v)
        S = mask.shape[-1]  # attend over the filled part of the cache only
        return F.scaled_dot_product_attention(q.transpose(1, 2), self.k[layer, :, :, :S], self.v[layer, :, :, :S],
                                              attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2])


class PrefixSharedCache:
    """Decode cache for several samples of each prompt: ONE copy of each prompt's keys/values (the
    prefix) plus, per sample row, the keys/values of the tokens it generated (its suffix).

    With a KVCache every row holds its own copy of the prompt, so each decode step reads that prompt
    n times from memory; here it is read once per prompt ("cascade" attention), and the memory is
    P prompts + B suffixes instead of B x (prompt + suffix). Exact: each query attends to the same
    keys as with copied rows, under one softmax.

      prefix_k, prefix_v [n_layers, P, n_kv, Lp, head_dim]: a KVCache filled by a prefill of the P
        prompts, right-padded (slot = position; prompt i has prompt_lengths[i] real slots).
      k, v [n_layers, B, n_kv, max_new, head_dim]: row b's generated tokens; the token at position p
        is in slot p - (its prompt's length), so its first generated token is in slot 0.
      Rows: counts[i] rows per prompt i, the rows of one prompt next to each other, prompts in order.
    Tensors live on the prompt cache's device (no .to(): built where it is used, for one generate).

    Semantics of Transformer.forward(input_ids [B, 1], positions [B, 1], cache) (decode: one token per
    row, no attn_mask): row b's query attends to the real slots of its prompt and to its own suffix
    slots up to its own (just written) one.

    The attention to the prefix runs per prompt, with the queries of its rows stacked ([P, n_kv,
    n_max * group, D] against [P, n_kv, Lp, D]): `grid` places row b at position (prompt, sample) of
    a P x n_max table, with empty places when prompts have fewer rows (after select_rows).

    static=True is for a torch.compile'd decode step (CUDA graphs need fixed shapes and no host
    sync): every step reads all max_new suffix slots and masks the later ones, instead of slicing
    the filled part, which needs the host to know how far the rows are; the prefix is the whole prompt
    cache (its width chosen by whoever allocated it, so that later prompts of other lengths fit: prefill
    them into it, then set_prompt_lengths); and the tensors the step reads or writes are marked as
    static inputs, so CUDA graphs use them in place instead of copying.
    """

    def __init__(self, prompt_cache: KVCache, prompt_lengths, counts, max_new_tokens, static=False):
        device = prompt_cache.k.device
        width = prompt_cache.max_len if static else int(max(prompt_lengths))
        self.prefix_k, self.prefix_v = prompt_cache.k[:, :, :, :width], prompt_cache.v[:, :, :, :width]
        n_layers, n_prompts, n_kv, _, head_dim = self.prefix_k.shape
        counts = torch.as_tensor(counts, device=device)
        rows = int(counts.sum())
        self.n_max = int(counts.max())
        self.row_prompt = torch.repeat_interleave(torch.arange(n_prompts, device=device), counts)
        first_row = torch.cumsum(counts, 0) - counts
        self.grid = self.row_prompt * self.n_max + torch.arange(rows, device=device) - first_row[self.row_prompt]
        self.row_length = torch.zeros(rows, dtype=torch.long, device=device)
        # 0 on a prompt's real slots, -inf on its pads; added to the prefix scores [P, n_kv, n_max * group, Lp]
        self.prefix_bias = torch.zeros(n_prompts, 1, 1, width, dtype=self.prefix_k.dtype, device=device)
        self.set_prompt_lengths(prompt_lengths)
        shape = (n_layers, rows, n_kv, max_new_tokens, head_dim)
        self.k = torch.zeros(shape, dtype=self.prefix_k.dtype, device=device)
        self.v = torch.zeros(shape, dtype=self.prefix_k.dtype, device=device)
        self.max_new = max_new_tokens
        self.static = static
        self._mark_static()

    def set_prompt_lengths(self, prompt_lengths):
        """The prompts' real lengths, written in place: a static cache serves each new batch of prompts of
        its shape, prefilled into the same prompt cache (rollout.StaticDecode)."""
        lengths = torch.as_tensor(prompt_lengths, device=self.row_length.device)
        self.row_length.copy_(lengths[self.row_prompt])
        pads = torch.arange(self.prefix_bias.shape[-1], device=lengths.device) >= lengths[:, None]
        self.prefix_bias.zero_().masked_fill_(pads[:, None, None], float("-inf"))

    def _mark_static(self):
        if self.static:
            for t in (self.prefix_k, self.prefix_v, self.prefix_bias, self.k, self.v, self.grid, self.row_length):
                torch._dynamo.mark_static_address(t)

    def select_rows(self, keep):
        """The same cache for rows `keep` only (finished rows dropped); the prefix is shared, not copied."""
        small = copy.copy(self)
        small.k, small.v = self.k.index_select(1, keep), self.v.index_select(1, keep)
        small.grid, small.row_length, small.row_prompt = self.grid[keep], self.row_length[keep], self.row_prompt[keep]
        small._mark_static()
        return small

    def attention_mask(self, positions, attn_mask=None):
        """(slot, S, later), built once per forward: each row's suffix slot for this step [B, 1], the
        number of suffix slots to read, and None when every row is at slot S - 1 (rows decode in
        lockstep), else the bool [B, 1, 1, S] of each row's later, stale slots, which it must not see."""
        if positions.shape[1] != 1 or attn_mask is not None:
            raise ValueError("PrefixSharedCache: decode steps only (one token per row, no attn_mask); "
                             "prefill prompts into a KVCache")
        slot = positions - self.row_length[:, None]
        if self.static:  # no host sync and a fixed S: read every suffix slot, mask the later ones (unchecked:
            # generate() never decodes past max_new_tokens)
            return slot, self.max_new, (torch.arange(self.max_new, device=slot.device) > slot)[:, None, None]
        first, S = int(slot.min()), int(slot.max()) + 1
        if first < 0 or S > self.max_new:
            raise ValueError(f"PrefixSharedCache: suffix slots {first}..{S - 1} outside 0..{self.max_new - 1}")
        later = None if first == S - 1 else (torch.arange(S, device=slot.device) > slot)[:, None, None]
        return slot, S, later

    def _to_prompts(self, x):
        """Rows [B, n_kv, group, X] -> per prompt [P, n_kv, n_max * group, X] (empty places zero)."""
        B, n_kv, group, X = x.shape
        P = self.prefix_k.shape[1]
        if B != P * self.n_max:  # rows were dropped: scatter them to their places
            x = x.new_zeros(P * self.n_max, n_kv, group, X).index_copy_(0, self.grid, x)
        return x.view(P, self.n_max, n_kv, group, X).transpose(1, 2).reshape(P, n_kv, self.n_max * group, X)

    def _to_rows(self, x, group):
        """Per prompt [P, n_kv, n_max * group, X] -> rows [B, n_kv, group, X] (inverse of _to_prompts)."""
        P, n_kv, _, X = x.shape
        x = x.view(P, n_kv, self.n_max, group, X).transpose(1, 2).reshape(P * self.n_max, n_kv, group, X)
        return x if len(self.grid) == P * self.n_max else x.index_select(0, self.grid)

    def attend(self, layer, q, k, v, positions, mask):
        """Store k, v [B, 1, n_kv, D] in the suffix, then attention of q [B, 1, H, D] -> [B, H, 1, D].

        softmax over [prefix scores, suffix scores] (one normaliser), then weights @ values per part.
        The group of H / n_kv query heads that share a kv head is one matrix against that head's keys
        (no K/V expansion, no per-head copies)."""
        slot, S, later = mask
        if later is None:  # lockstep: every row writes slot S - 1, a plain slice (cheaper than an index_put)
            self.k[layer, :, :, S - 1] = k[:, 0]
            self.v[layer, :, :, S - 1] = v[:, 0]
        else:
            self.update(layer, slot, k, v)
        B, _, H, D = q.shape
        n_kv = k.shape[2]
        group = H // n_kv
        q = q.view(B, n_kv, group, D) * (1.0 / math.sqrt(D))  # head h uses kv head h // group, as in HF
        Lp = self.prefix_k.shape[3]
        prefix = self._to_rows(self._to_prompts(q) @ self.prefix_k[layer].transpose(-1, -2) + self.prefix_bias,
                               group)                                                      # [B, n_kv, group, Lp]
        suffix = q @ self.k[layer, :, :, :S].transpose(-1, -2)                             # [B, n_kv, group, S]
        if later is not None:
            suffix = suffix.masked_fill(later, float("-inf"))
        weights = torch.softmax(torch.cat([prefix, suffix], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
        y = self._to_rows(self._to_prompts(weights[..., :Lp]) @ self.prefix_v[layer], group)
        y = y + weights[..., Lp:] @ self.v[layer, :, :, :S]                               # [B, n_kv, group, D]
        return y.reshape(B, H, 1, D)

    # Write k, v [B, 1, n_kv, head_dim] at suffix slots [B, 1] of each row: KVCache's write, on self.k / self.v.
    update = KVCache.update


# -----------------------------------------------------------------------------
# The model (module names = HF names)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in float32 then cast back before the weight, exactly as HF does (bf16 parity).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.args, self.layer = args, layer
        h, kv, d = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, h * d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, kv * d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, kv * d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(h * d, args.dim, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(d, args.norm_eps)
            self.k_norm = RMSNorm(d, args.norm_eps)

    def forward(self, x, cos, sin, mask, positions, cache):
        B, T, _ = x.shape
        a = self.args
        q = self.q_proj(x).view(B, T, a.n_heads, a.head_dim)
        k = self.k_proj(x).view(B, T, a.n_kv_heads, a.head_dim)
        v = self.v_proj(x).view(B, T, a.n_kv_heads, a.head_dim)
        if a.qk_norm:  # Qwen3: RMSNorm per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            y = cache.attend(self.layer, q, k, v, positions, mask)
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=a.n_kv_heads != a.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask=None, positions=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, config: dict | None = None):
        super().__init__()
        self.args = args
        self.config = dict(config) if config is not None else args.to_hf_config()  # raw HF config.json
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(Block(args, i) for i in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps),
        ))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the RoPE frequencies.
        self.inv_freq = rope_inv_freq(args)  # always on CPU first (even under a meta-device context)
        self.gradient_checkpointing = False  # recompute each block's activations in backward (SFT/RL memory)

    def tie_weights(self):
        if self.args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def setup_cache(self, batch_size, max_len, dtype=None) -> KVCache:
        """A KV cache for this model on its device (dtype defaults to the model's)."""
        w = self.model.embed_tokens.weight
        a = self.args
        return KVCache(a.n_layers, batch_size, max_len, a.n_kv_heads, a.head_dim, dtype or w.dtype, w.device)

    def forward(self, input_ids, positions=None, cache=None, attn_mask=None, mask=None, logits_at=None):
        """input_ids [B, T] -> float32 logits [B, T, vocab].

        No cache: causal attention in index order; `positions` (default arange(T)) only set RoPE;
        attn_mask [B, T] (bool, True = real token) hides pad keys; `mask` [B, 1, T, T] (bool, True =
        may attend) replaces the causal mask altogether (rl_bookkeeping.pack_groups: completions that share a
        prompt but not each other). With a cache: see KVCache, or PrefixSharedCache for decode steps of
        n samples per prompt. logits_at: index tensors (rows, cols) of the positions whose logits are
        wanted, -> logits [*rows.shape, vocab]: the vocabulary projection, the biggest matmul of a small
        model and the biggest activation of a 150k-vocabulary one, runs on those positions only.
        """
        B, T = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(T, device=device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        if cache is not None:
            mask = cache.attention_mask(positions, attn_mask)
        elif mask is None and attn_mask is not None:
            idx = torch.arange(T, device=device)
            causal = idx[None, :] <= idx[:, None]                                  # [T, T]
            mask = (causal & (attn_mask[:, None, :] | (idx[None, :] == idx[:, None])))[:, None]
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, positions, cache)
        x = self.model.norm(x)
        return self.lm_head(x if logits_at is None else x[logits_at]).float()


# -----------------------------------------------------------------------------
# LoRA: low-rank adapters on chosen Linear layers, the base frozen (written by hand, no PEFT)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen Linear layer W, b plus a trainable low-rank update (LoRA, Hu et al. 2021):

        y = W x + b + (alpha / r) * B A dropout(x)        A [r, in], B [out, r]

    A starts uniform in +-1/sqrt(in) (nn.Linear's and PEFT's init), B at zero, so training starts from
    the base model exactly. A and B are float32 whatever the base's dtype (a bf16 base keeps fp32
    adapters and fp32 AdamW moments for them). `enabled = False` computes W x + b alone (adapters_off).
    Module names are PEFT's: `<name>.base_layer` (the original nn.Linear, still an nn.Linear, so the
    sampler's oneDNN packing applies to it), `<name>.lora_A`, `<name>.lora_B`."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0, generator=None):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_A.weight.copy_((torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound)
            self.lora_B.weight.zero_()
        # Identity at p = 0: a zero-probability dropout would still draw random numbers in training.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        self.enabled = True

    def forward(self, x):
        y = self.base_layer(x)
        if not self.enabled:
            return y
        update = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))
        return y + (self.scaling * update).to(y.dtype)


def add_lora(model: Transformer, rank, alpha, dropout=0.0, targets=LORA_TARGETS, seed=0) -> Transformer:
    """Freeze every parameter of `model` and wrap the Linear layers named in `targets` (q_proj, ...,
    down_proj) of every block in a LoRALinear: the adapters are then the model's only trainable
    parameters. Their initial values are a function of `seed` alone. Records the settings in
    `model.lora` (save_adapter writes them)."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets or rank < 1:
        raise ValueError(f"add_lora: rank {rank}, targets {list(targets)}; expected rank >= 1 and targets among "
                         f"{list(LORA_TARGETS)}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in LORA_TARGETS:  # a fixed order: the same seed gives the same adapters
                if name in targets and hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout, generator))
    model.lora = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
                  "target_modules": [t for t in LORA_TARGETS if t in targets]}
    return model


@contextlib.contextmanager
def adapters_off(model):
    """Inside the block every LoRALinear of `model` computes W x + b alone: the base model, no copy made."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(layers, before):
            m.enabled = enabled


class AdaptersOff:
    """`model` seen with its adapters switched off, called like the model: the base weights alone.
    Under LoRA, RL's KL reference is the policy's own frozen base, so no second copy of the weights
    exists (a full reference model of an 8B student is 16 GB of bf16)."""

    def __init__(self, model):
        self.model = model

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)


def merge_lora_weight(weight, lora_A, lora_B, scaling):
    """Merged LoRA weight W' = W + (alpha / r) * B A, computed in float32, returned in W's dtype."""
    return (weight.float() + scaling * (lora_B.float() @ lora_A.float())).to(weight.dtype)


def merged_state_dict(model: Transformer) -> dict:
    """The model's tensors under HF names with every adapter folded into its base weight
    (merge_lora_weight): a plain checkpoint of the adapted model, in the base's dtype. A model without
    adapters gives its state_dict unchanged. The merged matrices are made on the CPU, one at a time (the
    checkpoint is written from the CPU anyway): merging on the GPU would hold a second copy of every
    targeted matrix there at once, 14 GB for Qwen3-8B."""
    state = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            del state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
            weight = state.pop(f"{name}.base_layer.weight").detach().cpu()
            state[f"{name}.weight"] = merge_lora_weight(weight, m.lora_A.weight.detach().cpu(),
                                                        m.lora_B.weight.detach().cpu(), m.scaling)
            if f"{name}.base_layer.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state


def save_adapter(model: Transformer, out_dir, base_model=""):
    """The adapters alone, in PEFT's file format (peft.PeftModel.from_pretrained reads it):
    adapter_model.safetensors with float32 tensors `base_model.model.<module>.lora_A.weight` [r, in] and
    `...lora_B.weight` [out, r], and adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout,
    target_modules, base_model_name_or_path)."""
    state = {f"base_model.model.{name}.{part}.weight": getattr(m, part).weight.detach().cpu().contiguous()
             for name, m in model.named_modules() if isinstance(m, LoRALinear) for part in ("lora_A", "lora_B")}
    if not state:
        raise ValueError("save_adapter: the model has no LoRA adapters (add_lora)")
    with unwritable_as_data_error(os.path.join(out_dir, "adapter_model.safetensors")):
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, ".tmp-adapter_model.safetensors")
        _save_safetensors(state, tmp)
        os.replace(tmp, os.path.join(out_dir, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", **model.lora, "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "use_rslora": False,
              "use_dora": False, "base_model_name_or_path": base_model}
    atomic_write_text(os.path.join(out_dir, "adapter_config.json"), json.dumps(config, indent=2) + "\n")
    return out_dir


# -----------------------------------------------------------------------------
# Init, load, save


@torch.no_grad()
def init_weights(model: Transformer, std=0.02, seed=0):
    """Fresh weights for a model trained from scratch: N(0, std) matrices, zero biases, unit norms."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():  # shared (tied) tensors appear once
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def checkpoint_files(path):
    """The safetensors files of an HF checkpoint dir: model.safetensors, or the shards its
    model.safetensors.index.json names (shard_files)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        return shard_files(read_json(index, "a safetensors index {\"weight_map\": {tensor: shard file}}"), index)
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _read_safetensors(path, files, device, dtype):
    """All tensors of the checkpoint files `files` of `path`, cast to `dtype` shard by shard so at most
    one shard exists in both dtypes."""
    state = {}
    for name in files:
        state.update({k: v.to(dtype) for k, v in load_file(os.path.join(path, name), device=str(device)).items()})
    return state


def shard_files(index, where="model.safetensors.index.json"):
    """The shard file names of a safetensors index ({"weight_map": {tensor: file}}), sorted. Each must be
    a plain file name inside the checkpoint directory: an absolute path, "..", or a folder separator
    would let a downloaded index make us read any file on the machine."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{where}: weight_map: expected an object {{tensor name: shard file name}}")
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\:\0"):
            raise ValueError(f"{where}: weight_map[{tensor!r}]: shard {name!r} is not a plain file name; "
                             "expected a file inside the checkpoint directory (no folders, no absolute path)")
    return sorted(set(weight_map.values()))


# bytes per element of each safetensors dtype
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on a header


def safetensors_shapes(path):
    """{tensor name: shape} from the header of a safetensors file, read without loading a tensor: 8 bytes
    (little-endian header length n), n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then
    the data. The header must be whole, each tensor's bytes must be its shape times its dtype's size, and
    the file must hold every byte the header promises: a truncated or damaged file is one ValueError
    naming it, before anything is allocated for it."""
    damaged = f"{path}: truncated or damaged safetensors file (%s); expected a complete file: copy or save it again"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or n > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(damaged % f"{size} bytes, {'no header' if n is None else f'a header of {n} bytes'}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(damaged % "its header is not a JSON object")
    shapes, data_end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = info if isinstance(info, dict) else {}
        shape, offsets, dtype = info.get("shape"), info.get("data_offsets"), info.get("dtype")
        ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                        for x in xs)
        if not (ints(shape) and ints(offsets) and len(offsets) == 2 and dtype in DTYPE_BYTES
                and offsets[1] - offsets[0] == math.prod(shape) * DTYPE_BYTES[dtype]):
            raise ValueError(damaged % f"tensor {name}: dtype {dtype!r}, shape {shape!r} and data_offsets {offsets!r} "
                                       "do not agree")
        shapes[name], data_end = tuple(shape), max(data_end, offsets[1])
    if 8 + n + data_end > size:
        raise ValueError(damaged % f"its header promises {data_end} bytes of tensor data, it holds {size - 8 - n}")
    return shapes


def checkpoint_shapes(path, files):
    """{tensor name: shape} over the checkpoint files `files` of `path`, from their headers alone."""
    shapes = {}
    for name in files:
        for tensor, shape in safetensors_shapes(os.path.join(path, name)).items():
            if tensor in shapes:
                raise ValueError(f"{path}: tensor {tensor} is in two shards; expected each tensor once")
            shapes[tensor] = shape
    return shapes


def expected_shapes(args: ModelArgs) -> dict:
    """{HF tensor name: shape} of the model ModelArgs describes, computed without building it (a tied
    lm_head is left out: it is the embedding). Equal to Transformer(args).state_dict()'s shapes."""
    d, hd, inter = args.dim, args.head_dim, args.intermediate_size
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (args.vocab_size, d), "model.norm.weight": (d,)}
    if not args.tie_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                       p + "mlp.down_proj.weight": (d, inter)})
        if args.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if args.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if args.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if args.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                           p + "mlp.down_proj.bias": (d,)})
    return shapes


def check_checkpoint_shapes(path, args: ModelArgs, shapes):
    """Compare what config.json describes with the tensors the safetensors headers hold (`shapes`), before
    anything is built: the layer count first (num_hidden_layers 10⁹ beside two layers of weights must not
    start a loop of 10⁹ blocks), then every tensor's name and shape (head_dim 10¹² must not build a RoPE
    table of 10¹² entries). Each size of the model is then backed by bytes of the checkpoint."""
    layers = {name.split(".")[2] for name in shapes if name.startswith("model.layers.") and name.count(".") > 2}
    if args.n_layers > len(layers):
        raise ValueError(f"{path}/config.json: num_hidden_layers {args.n_layers}, but the safetensors hold "
                         f"{len(layers)} layer(s); expected the checkpoint's own config.json")
    expected = expected_shapes(args)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise KeyError(f"{path}: checkpoint is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                       f" expected by model_type {args.model_type!r}")
    ignored = lambda k: k.endswith("rotary_emb.inv_freq") or (args.tie_embeddings and k == "lm_head.weight")
    unexpected = sorted(k for k in shapes if k not in expected and not ignored(k))
    if unexpected:
        raise KeyError(f"{path}: checkpoint has tensor(s) this model does not use: {unexpected[:5]}")
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise ValueError(f"{path}: tensor {k} has shape {shapes[k]}, config.json implies {shape}")
    if args.tie_embeddings and "lm_head.weight" in shapes and shapes["lm_head.weight"] != expected["model.embed_tokens.weight"]:
        raise ValueError(f"{path}: tensor lm_head.weight has shape {shapes['lm_head.weight']}, config.json implies "
                         f"{expected['model.embed_tokens.weight']} (tied to the embedding)")


def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Read config.json and the safetensors headers, check that they agree (check_checkpoint_shapes:
    nothing is allocated for what the checkpoint cannot back), build the model on the meta device (no
    random init) and assign the checkpoint's tensors."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: {'no config.json in this' if os.path.isdir(path) else 'model'} directory; "
                                "expected a local Hugging Face checkpoint directory (config.json, *.safetensors)")
    config = read_json(os.path.join(path, "config.json"), "a JSON object of model settings")
    try:
        args = ModelArgs.from_hf_config(config)
    except ValueError as e:
        raise ValueError(f"{path}/{e}") from None
    files = checkpoint_files(path)
    check_checkpoint_shapes(path, args, checkpoint_shapes(path, files))
    with torch.device("meta"):
        model = Transformer(args, config)
    expected = set(model.state_dict())
    if args.tie_embeddings:
        expected.discard("lm_head.weight")
    state = {k: v for k, v in _read_safetensors(path, files, device, dtype).items() if k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced the shared parameter; share it again
    return model.eval()


def check_tokenizer_fits(tokenizer, model_or_args, where):
    """The tokenizer's ids must all be rows of the model's embedding: len(tokenizer) (added tokens
    included) and its highest added id below vocab_size. A larger tokenizer gives an index error at the
    first prefill on a CPU and a device-side assert on a GPU; this says so first, in one line naming
    `where` (the checkpoint or tokenizer folder). A smaller one is normal (embeddings padded to a
    multiple of 64 or 128)."""
    args = getattr(model_or_args, "args", model_or_args)
    added = [i for i in tokenizer.get_added_vocab().values()] if hasattr(tokenizer, "get_added_vocab") else []
    n_ids = max([len(tokenizer)] + [i + 1 for i in added])
    if n_ids > args.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {n_ids} token ids but the model's embedding has "
                         f"{args.vocab_size} rows (vocab_size of config.json); expected a tokenizer no larger than "
                         "the embedding (the checkpoint's own tokenizer files)")
    return n_ids


def _save_safetensors(state, tmp):
    """save_file + fsync. The file is created here first, so that a folder we cannot write is an OSError
    (unwritable_as_data_error names it) rather than safetensors' own error; an I/O error of safetensors
    itself (a full disk) is reported as one too."""
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
    try:
        save_file(state, tmp, metadata={"format": "pt"})
    except SafetensorError as e:
        if "I/O error" not in str(e):
            raise
        raise OSError(errno.EIO if "os error 28" not in str(e) else errno.ENOSPC, str(e), tmp) from None
    fsync_file(tmp)


def save_model(model: Transformer, out_dir, tokenizer_dir=None, state=None):
    """config.json + model.safetensors with HF names (transformers loads it as is), + tokenizer files.
    LoRA adapters are merged into their base weights (merged_state_dict). `state`: the weights to write
    instead of the model's own (a sharded model's, gathered)."""
    with unwritable_as_data_error(os.path.join(out_dir, "model.safetensors")):
        os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in (merged_state_dict(model) if state is None else state).items()}
    if model.args.tie_embeddings:
        del state["lm_head.weight"]  # safetensors refuses shared tensors; HF re-ties from the config
    dtype = state["model.embed_tokens.weight"].dtype
    config = dict(model.config)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    tmp = os.path.join(out_dir, ".tmp-model.safetensors")
    with unwritable_as_data_error(os.path.join(out_dir, "model.safetensors")):
        _save_safetensors(state, tmp)  # on the disk before the rename: never a truncated model.safetensors
        os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.exists(index):  # a stale index would make loaders read old shards
        os.unlink(index)
    fsync_dir(out_dir)
    atomic_write_text(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
                shutil.copyfile(src, os.path.join(out_dir, name))
    return out_dir
