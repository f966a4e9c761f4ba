"""Our model against transformers' MixtralForCausalLM on checkpoints that transformers saved."""

from __future__ import annotations

import json

import torch

from serving import load_model
from serving.engine.generate import generate
from serving.engine.sampling import SamplingParams


def _hf(path):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_checkpoint_layout_is_what_transformers_writes(hf_checkpoint):
    config = json.loads((hf_checkpoint / "config.json").read_text())
    # transformers 5 writes rope_parameters, not rope_theta; our loader must read that form.
    assert "rope_parameters" in config or "rope_theta" in config
    model = load_model(hf_checkpoint)
    expected = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    assert model.config.rope_theta == expected


def test_logits_match_transformers(hf_checkpoint):
    torch.manual_seed(1)
    ours, ref = load_model(hf_checkpoint), _hf(hf_checkpoint)
    ids = torch.randint(0, ours.config.vocab_size, (3, 37))
    with torch.no_grad():
        expected = ref(ids).logits
    got = ours(ids)
    assert got.shape == expected.shape == (3, 37, ours.config.vocab_size)
    assert (got - expected).abs().max().item() < 1e-4
    # Not trivially equal: the logits carry real signal across positions.
    assert expected.std().item() > 0.1


def test_greedy_generation_matches_transformers(hf_checkpoint):
    ours, ref = load_model(hf_checkpoint), _hf(hf_checkpoint)
    prompt = [5, 17, 42, 9, 77, 3]
    with torch.no_grad():
        hf_out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    got = list(generate(ours, prompt, SamplingParams(max_tokens=20)))
    assert got == hf_out
    assert len(set(got)) > 1  # a model stuck on one token would hide cache bugs


def test_bfloat16_close_to_transformers(hf_checkpoint):
    from transformers import MixtralForCausalLM

    ours = load_model(hf_checkpoint, dtype=torch.bfloat16)
    ref = MixtralForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.bfloat16).eval()
    ids = torch.randint(
        0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = ours(ids).float()
    assert got.dtype == torch.float32 and ours.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; compare against the logits' own scale.
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()
