"""Generation: the KV cache against full recomputation, sampling, stopping, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from serving import load_model
from serving.engine.generate import generate
from serving.engine.sampling import SamplingParams, most_likely, sample
from serving.errors import UserError

from ..conftest import REPO


@pytest.fixture(scope="module")
def model(demo_path):
    return load_model(demo_path)


def test_incremental_decode_equals_full_forward(model):
    ids = torch.randint(
        3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    full = model(ids)
    cache = model.new_cache(2, 16)
    first = model(ids[:, :7], cache=cache, start_pos=0)
    steps = [model(ids[:, i : i + 1], cache=cache, start_pos=i) for i in range(7, 12)]
    got = torch.cat([first, *steps], dim=1)
    assert (got - full).abs().max().item() < 1e-5


def test_sequences_at_different_positions_share_a_step(model):
    """Two sequences of different lengths decode in one batch through their own cache slots."""
    a = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    b = torch.randint(3, 300, (1, 4), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(4, 16)
    slots = torch.tensor([3, 1])
    model(a[:, :8], cache=cache, start_pos=0, slots=slots[:1])
    model(b[:, :3], cache=cache, start_pos=0, slots=slots[1:])
    step = model(
        torch.stack([a[0, 8:9], b[0, 3:4]]),
        cache=cache,
        start_pos=torch.tensor([8, 3]),
        slots=slots,
    )
    assert torch.allclose(step[0, -1], model(a)[0, -1], atol=1e-5)
    assert torch.allclose(step[1, -1], model(b)[0, -1], atol=1e-5)


def test_greedy_is_deterministic_and_sampling_is_seeded(model):
    greedy = list(generate(model, [1, 40, 41, 42], SamplingParams(max_tokens=12)))
    assert greedy == list(generate(model, [1, 40, 41, 42], SamplingParams(max_tokens=12)))
    hot = SamplingParams(max_tokens=12, temperature=1.5, seed=7)
    first = list(generate(model, [1, 40, 41, 42], hot))
    assert first == list(generate(model, [1, 40, 41, 42], hot))
    assert first != list(generate(model, [1, 40, 41, 42], hot.model_copy(update={"seed": 8})))


def test_the_most_likely_token_is_argmaxs_ties_and_nan_included():
    # The engine's greedy pick (a faster reduction than argmax) must pick what argmax picks:
    # the first of equal maxima, and a NaN where a row has one.
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 4, (64, 1000), generator=g).float()  # many ties
    odd = torch.zeros(6, 32000)
    odd[1, 7] = float("nan")
    odd[2, 5] = odd[2, 31999] = 1.0
    odd[3, 9] = odd[3, 11] = float("inf")
    odd[4] = float("-inf")
    odd[5, 3], odd[5, 31998] = float("inf"), float("nan")
    for logits in (rows, odd, torch.randn(16, 32000, generator=g)):
        assert torch.equal(most_likely(logits), logits.argmax(dim=-1))


def test_top_p_tiny_is_greedy():
    logits = torch.randn(5, 50)
    params = SamplingParams(temperature=1.0, top_p=1e-6)
    assert torch.equal(sample(logits, params, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_stops_on_eos(model):
    first = next(iter(generate(model, [1, 40, 41], SamplingParams(max_tokens=5))))
    out = list(generate(model, [1, 40, 41], SamplingParams(max_tokens=5, stop_token_ids=(first,))))
    assert out == [first]


def test_context_overflow_is_a_clear_error(model):
    with pytest.raises(
        UserError, match=r"prompt \(2040 tokens\) \+ max_tokens \(20\) exceeds .* 2048"
    ):
        list(generate(model, [5] * 2040, SamplingParams(max_tokens=20)))


def test_cli_generate_json_matches_library(model, demo_path):
    from serving.engine.tokenizer import TextTokenizer

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli.command",
            "generate",
            "--prompt",
            "Hello, world",
            "--max-tokens",
            "10",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    ids = TextTokenizer(demo_path).encode("Hello, world")
    assert out["token_ids"] == list(generate(model, ids, SamplingParams(max_tokens=10)))
    assert out["completion_tokens"] == 10 and out["prompt_tokens"] == len(ids)


def test_cli_rejects_bad_sampling_args():
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "generate", "--prompt", "x", "--top-p", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and "--top-p" in proc.stderr and "Traceback" not in proc.stderr
