"""
Tiny random HF checkpoints for parity tests (CPU, no downloads). Shared by test_model.py and the
rollout tests.

    FAMILIES                          names accepted by make_checkpoint
    make_checkpoint(family, out_dir, seed=0, max_shard_size=None, **config_overrides) -> out_dir
        Builds a transformers model of that family (vocab 256, hidden 64, 2 layers, 4 heads, 2 kv heads),
        gives EVERY parameter random values (norm weights around 1, biases non-zero, std 0.1 matrices,
        so logits are peaked and greedy ties are unlikely), and save_pretrained()s it as safetensors
        (sharded when max_shard_size is given, e.g. "60KB").
        Families: "llama3" (llama3 rope_scaling, tied embeddings), "qwen2" (q/k/v bias, untied),
        "qwen3" (q_norm/k_norm, head_dim 24 != 64/4, untied), "llama_untied" (plain rope, untied,
        attention_bias + mlp_bias on).
    hf_model(path) -> transformers model in float32, eval mode (the reference).
    hf_greedy(hf, prompt_ids, max_new_tokens) -> list[int]  HF generate(do_sample=False) continuation
        (ends at eos id 2 if produced, else max_new_tokens long).
"""
import torch

VOCAB = 256
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _family_config(family, overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    if family == "llama3":
        cfg = LlamaConfig(**{**BASE, "tie_word_embeddings": True, "rope_theta": 500000.0,
                             "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                             **overrides})
    elif family == "llama_untied":
        cfg = LlamaConfig(**{**BASE, "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True,
                             **overrides})
    elif family == "qwen2":
        cfg = Qwen2Config(**{**BASE, "tie_word_embeddings": False, "rope_theta": 1000000.0, **overrides})
    elif family == "qwen3":
        cfg = Qwen3Config(**{**BASE, "tie_word_embeddings": False, "head_dim": 24, **overrides})
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return cfg


FAMILIES = ("llama3", "qwen2", "qwen3", "llama_untied")


@torch.no_grad()
def make_checkpoint(family, out_dir, seed=0, max_shard_size=None, **config_overrides):
    from transformers import AutoModelForCausalLM
    cfg = _family_config(family, config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.2 * noise)
        else:
            p.copy_(0.1 * noise)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return str(out_dir)


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(hf, prompt_ids, max_new_tokens):
    ids = torch.tensor([prompt_ids])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                      pad_token_id=0)  # stops early at eos (id 2), like any greedy loop that honours it
    return out[0, len(prompt_ids):].tolist()
