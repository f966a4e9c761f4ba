"""The demo checkpoint and the tokenizer, checked against transformers' own tokenizer loading."""

from __future__ import annotations

import hashlib

from serving import load_model
from serving.engine.demo import CHAT_TEMPLATE, write_checkpoint
from serving.engine.tokenizer import TextTokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Héllo again 😀"},
]


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_demo_is_deterministic(tmp_path):
    assert _digest(write_checkpoint(tmp_path / "a")) == _digest(write_checkpoint(tmp_path / "b"))


def test_demo_loads_and_matches_transformers(demo_path):
    import torch
    from transformers import MixtralForCausalLM

    ours = load_model(demo_path)
    ref = MixtralForCausalLM.from_pretrained(demo_path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < 1e-4
    assert ours.config.vocab_size == TextTokenizer(demo_path).vocab_size


def test_tokenizer_round_trip_and_bos(demo_path):
    tok = TextTokenizer(demo_path)
    text = "Hello, wörld! 😀 mixture of experts"
    ids = tok.encode(text)
    assert ids[0] == tok.token_id("<s>") == 1
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned: not one token per byte


def test_same_ids_and_chat_prompt_as_transformers(demo_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(demo_path)
    tok = TextTokenizer(demo_path)
    for text in ["Hello, world", "  spaces\tand\nnewlines ", "ünïcödé 😀"]:
        assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.render_chat(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False)
    assert tok.render_chat(MESSAGES).startswith("<s>[INST] Be brief.\n\nHi there [/INST]Hello.</s>")
    assert tok.encode_chat(MESSAGES)[0] == 1 and tok.encode_chat(MESSAGES)[1] != 1
    assert "raise_exception" in CHAT_TEMPLATE
