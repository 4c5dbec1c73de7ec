"""rollout.py: greedy decoding reads a stated confidence as a value 1..10 (ConfidenceValues, ValueReader).

The model is a real model.Transformer whose next-token distribution depends on the last token only,
set by hand (markov_model); the tokenizer writes numbers digit by digit, or with `10` as one token.
"""
import math

import pytest
import torch

import rollout
from confprofile import ends_before_confidence, format_answer, load_taxonomy, parse_answer, parse_answer_spans
from model import ModelArgs, Transformer

HEAD = '{"gender": {"label": "female", '
PIECES = ["<eos>", HEAD, '"confidence"', ":", " ", *"0123456789", "}}", ",", "x"]
TAXONOMY = {"dimensions": {"gender": {"classes": ["female", "male", "NA"]}}}


class PieceTokenizer:
    """A tokenizer over a fixed list of pieces: encode is greedy longest match, decode joins."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def __len__(self):
        return len(self.pieces)

    def encode(self, text, add_special_tokens=False):
        ids = []
        while text:
            i = max((i for i, p in enumerate(self.pieces) if p and text.startswith(p)), key=lambda i: len(self.pieces[i]))
            ids.append(i)
            text = text[len(self.pieces[i]):]
        return ids

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)

    def batch_decode(self, seqs):
        return [self.decode(s) for s in seqs]


def markov_model(pieces, table):
    """A one-layer Transformer whose next-token distribution after token `a` is table[a] ({piece: probability},
    the rest ~0): embeddings one-hot, the layer's outputs zero, lm_head the log-probabilities."""
    V = len(pieces)
    args = ModelArgs(model_type="llama", vocab_size=V, dim=V, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                     intermediate_size=8, max_position_embeddings=256)
    model = Transformer(args)
    logits = torch.full((V, V), -40.0)
    for a, dist in table.items():
        if a not in pieces:
            continue
        for b, p in dist.items():
            logits[pieces.index(a), pieces.index(b)] = math.log(p)
    scale = 1.0 / math.sqrt(1.0 / V + args.norm_eps)  # RMSNorm of a one-hot embedding
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        model.model.norm.weight.fill_(1.0)
        for block in model.model.layers:
            block.input_layernorm.weight.fill_(1.0)
            block.post_attention_layernorm.weight.fill_(1.0)
        model.lm_head.weight.copy_(logits.T / scale)  # logits after a = row a of the table
    return model.eval()


def answer_table(at_value, after_one=None):
    """HEAD -> "confidence" -> ":" -> " " -> at_value (the number's first token); "1" -> after_one; a number -> "}}"."""
    table = {HEAD: {'"confidence"': 1.0}, '"confidence"': {":": 1.0}, ":": {" ": 1.0}, " ": at_value,
             "}}": {"<eos>": 1.0}}
    for d in "0123456789":
        table[d] = {"}}": 1.0}
    table["10"] = {"}}": 1.0}
    if after_one:
        table["1"] = after_one
    return table


def greedy(model, tok, tokenizer=None, confidence="value", n_rows=1):
    sampling = rollout.SamplingParams(max_new_tokens=12, temperature=0.0, stop_ids=(0,), confidence=confidence)
    prompts = [tok.encode(HEAD)] * n_rows
    return [g[0] for g in rollout.generate(model, prompts, sampling, tokenizer=tokenizer)]


def stated(tok, sample):
    """The confidence the whole answer (prompt head + completion) states, as the parser reads it."""
    text = HEAD + tok.decode([t for t in sample.tokens if t != 0])
    return parse_answer(text, TAXONOMY)["dims"]["gender"]["confidence"]


ISSUE = {"7": 0.15, "1": 0.19, **{d: 0.66 / 7 for d in "2345689"}}  # the issue's case: "1" splits 0.095 / 0.095


def test_value_probabilities_and_read_value_by_hand():
    tok = PieceTokenizer(PIECES)
    cv = rollout.confidence_values(tok)
    one, zero, close = tok.encode("1")[0], tok.encode("0")[0], tok.encode("}}")[0]
    assert cv.values[9] == (one, zero) and rollout.value_prefixes(cv.values) == [(one,)]
    first = [0.0] * len(tok)
    for d, p in ISSUE.items():
        first[tok.encode(d)[0]] = p
    after = [0.0] * len(tok)
    after[zero], after[close] = 0.5, 0.5
    probs = rollout.value_probabilities(first, {(one,): after}, cv.values, cv.continues)
    assert probs[0] == pytest.approx(0.095) and probs[9] == pytest.approx(0.095) and probs[6] == pytest.approx(0.15)
    assert rollout.read_value(probs) == 7
    # expectation: (0.095 * 1 + 0.095 * 10 + 0.15 * 7 + 0.66 / 7 * 37) / 1.0 = 5.58 -> 6
    assert rollout.read_value(probs, "expected") == 6
    # "1" not looked at: 1 and 10 are unknown (None) and cannot be chosen
    probs = rollout.value_probabilities(first, {}, cv.values, cv.continues)
    assert probs[0] is None and probs[9] is None and rollout.read_value(probs) == 7


def test_value_greedy_picks_7_where_token_greedy_reads_10():
    tok = PieceTokenizer(PIECES)
    model = markov_model(PIECES, answer_table(ISSUE, {"0": 0.5, "}}": 0.5}))
    token_level = greedy(model, tok)  # no tokenizer: token by token
    assert tok.decode(token_level[0].tokens) == '"confidence": 10}}<eos>'  # "1" (0.19) first, then the tie to "0"
    assert greedy(model, tok, tok, confidence="token")[0].tokens == token_level[0].tokens
    value_level = greedy(model, tok, tok, n_rows=3)
    for sample in value_level:
        assert tok.decode(sample.tokens) == '"confidence": 7}}<eos>'
        assert stated(tok, sample) == 7
        assert sample.logprobs[3] == pytest.approx(math.log(0.15), abs=1e-4)  # the logprob of the token written
    expected = greedy(model, tok, tok, confidence="expected")[0]
    assert tok.decode(expected.tokens) == '"confidence": 6}}<eos>' and stated(tok, expected) == 6


def test_value_greedy_ends_the_number_it_chose():
    # P(1) = 0.4 * (0.3 + 0.3) = 0.24 beats P(7) = 0.2 and P(10) = 0.16, but after "1" the likeliest token is "0"
    tok = PieceTokenizer(PIECES)
    model = markov_model(PIECES, answer_table({"1": 0.4, "7": 0.2, "5": 0.2, "3": 0.2},
                                              {"0": 0.4, "}}": 0.3, ",": 0.3}))
    assert tok.decode(greedy(model, tok)[0].tokens) == '"confidence": 10}}<eos>'
    sample = greedy(model, tok, tok)[0]
    assert tok.decode(sample.tokens) == '"confidence": 1}}<eos>' and stated(tok, sample) == 1
    # and 10 where it is the most probable: P(10) = 0.4 * 0.7 = 0.28 > 0.2
    model = markov_model(PIECES, answer_table({"1": 0.4, "7": 0.2, "5": 0.2, "3": 0.2}, {"0": 0.7, "}}": 0.3}))
    sample = greedy(model, tok, tok)[0]
    assert tok.decode(sample.tokens) == '"confidence": 10}}<eos>' and stated(tok, sample) == 10


@pytest.mark.parametrize("seed", range(5))
def test_value_greedy_is_token_greedy_where_10_is_one_token(seed):
    pieces = PIECES + ["10"]
    tok = PieceTokenizer(pieces)
    cv = rollout.confidence_values(tok)
    assert all(len(t) == 1 for t in cv.values) and rollout.value_prefixes(cv.values) == []
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(13, generator=g) ** 4  # the values 1..10, "0", "x" and " ": spread, some tiny
    at_value = dict(zip([*(str(v) for v in range(1, 11)), "0", "x", " "], (weights / weights.sum()).tolist()))
    model = markov_model(pieces, answer_table(at_value))
    token_level, value_level = greedy(model, tok, n_rows=2), greedy(model, tok, tok, n_rows=2)
    for a, b in zip(token_level, value_level):
        assert a.tokens == b.tokens and a.logprobs == b.logprobs and a.finish_reason == b.finish_reason


def test_sampling_is_unchanged_by_the_tokenizer():
    tok = PieceTokenizer(PIECES)
    model = markov_model(PIECES, answer_table(ISSUE, {"0": 0.5, "}}": 0.5}))
    sampling = rollout.SamplingParams(max_new_tokens=12, temperature=1.0, stop_ids=(0,))
    prompts = [tok.encode(HEAD)] * 3
    plain = rollout.generate(model, prompts, sampling, n=4, seed=5)
    given = rollout.generate(model, prompts, sampling, n=4, seed=5, tokenizer=tok)
    assert [[(s.tokens, s.logprobs) for s in g] for g in plain] == [[(s.tokens, s.logprobs) for s in g] for g in given]
    assert len({tuple(s.tokens) for g in plain for s in g}) > 1  # it did sample


def test_sampling_params_check_the_confidence_setting():
    with pytest.raises(ValueError, match="confidence: expected one of value, expected, token"):
        rollout.SamplingParams(confidence="mean").check()


def test_a_confidence_starts_exactly_where_the_parser_reads_one():
    taxonomy = load_taxonomy()
    profile = {dim: {"label": "NA", "confidence": c, "evidence": 'said "confidence": 9'}
               for c, dim in enumerate(taxonomy["dimensions"], 3)}
    text = format_answer(profile, taxonomy).replace('"confidence": 4', '"Confidence" :\n4')
    _, spans = parse_answer_spans(text, taxonomy)
    starts = {a for sp in spans.values() for a, _ in sp["confidence"]}
    assert len(starts) == 6
    found = {i for i in range(len(text) + 1) if ends_before_confidence(text[:i])}
    # right after the colon, and after each whitespace character up to the number
    assert found == {i for a in starts for i in range(text.rindex(":", 0, a) + 1, a + 1)}


@pytest.mark.parametrize("family", ["qwen3", "smollm2"])
def test_confidence_values_of_real_tokenizers(family):
    import tokenizer_families
    tok = tokenizer_families.load(family)
    cv = rollout.confidence_values(tok)
    assert [tok.decode(list(t)) for t in cv.values] == [str(v) for v in range(1, 11)]
    assert len(cv.values[9]) == 2 and rollout.value_prefixes(cv.values) == [cv.values[0]]  # "1", "0": digit by digit
    assert {t[0] for t in cv.values} <= set(cv.continues)
    assert all(i in cv.may_precede for i in tok.encode('": ', add_special_tokens=False)[-1:])
    assert rollout.confidence_values(tok) is cv  # derived once per tokenizer
