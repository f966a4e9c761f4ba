"""One forward over a flat step batch (decode rows at different positions and prompt chunks,
fresh and mid-prompt) gives each sequence the logits it gets alone."""

from __future__ import annotations

import torch

from serving import load_model
from serving.engine.step_batch import step_batch


def test_a_mixed_step_equals_each_sequence_alone(hf_checkpoint):
    model = load_model(hf_checkpoint)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (9, 14, 20, 12)]
    # Sequences 0 and 1 are decoding (their prompts cached), 2 is mid-prompt (first 7 cached),
    # 3 is fresh. Reference: each alone, in a cache of its own.
    refs, cache = [], model.new_cache(4, 32)
    for slot, (prompt, cached) in enumerate(zip(prompts, (9, 14, 7, 0), strict=True)):
        if cached:
            model(torch.tensor([prompt[:cached]]), cache=cache, slots=torch.tensor([slot]))
    alone = model.new_cache(4, 32)
    for slot, prompt in enumerate(prompts):
        refs.append(model(torch.tensor([prompt]), cache=alone, slots=torch.tensor([slot]))[0, -1])
    decodes = [(prompts[0][8], 0, 8), (prompts[1][13], 1, 13)]  # re-run each last prompt token
    chunks = [(prompts[2][7:], 2, 7, True), (prompts[3], 3, 0, True)]
    batch = step_batch(decodes, chunks)
    assert batch.decode_ragged and batch.decode_keys == 14 and len(batch.spans) == 2
    logits = model.step(batch, cache)  # [4, V]
    for row, ref in enumerate(refs):
        assert (logits[row] - ref).abs().max().item() < 1e-4


def test_two_micro_batches_give_the_same_logits(hf_checkpoint):
    """The ping-pong form (serving/engine/model.py _step_in_halves) is row-wise the same
    arithmetic: at 1e-5 of one batch, here with the experts in process."""
    model = load_model(hf_checkpoint)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (9, 14, 20, 12, 7)]
    caches = [model.new_cache(5, 32), model.new_cache(5, 32)]
    for cache in caches:
        for slot in (0, 1, 4):
            model(torch.tensor([prompts[slot]]), cache=cache, slots=torch.tensor([slot]))
    decodes = [(3, 0, 9), (5, 1, 14), (7, 4, 7)]
    chunks = [(prompts[2], 2, 0, True), (prompts[3][:6], 3, 0, False)]
    whole = model.step(step_batch(decodes, chunks), caches[0])
    split = model._step_in_halves(step_batch(decodes, chunks), caches[1])
    assert split.shape == whole.shape == (4, vocab)
    assert (split - whole).abs().max().item() < 1e-5
    assert torch.equal(caches[0].k, caches[1].k) or (caches[0].k - caches[1].k).abs().max() < 1e-6


def test_consecutive_decode_slots_read_as_a_view_give_the_same_logits(hf_checkpoint):
    from dataclasses import replace

    from serving.engine.step_batch import consecutive_from, halves

    assert consecutive_from([2, 3, 4]) == 2 and consecutive_from([5]) == 5
    assert consecutive_from([3, 2]) is None and consecutive_from([0, 2]) is None
    assert consecutive_from([]) is None
    model = load_model(hf_checkpoint)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
               for n in (9, 14, 11)]  # fmt: skip
    cache = model.new_cache(4, 32)
    for slot, prompt in enumerate(prompts, start=1):
        model(torch.tensor([prompt]), cache=cache, slots=torch.tensor([slot]))
    batch = step_batch([(p[-1], slot, len(p) - 1) for slot, p in enumerate(prompts, start=1)], [])
    assert batch.decode_first_slot == 1  # slots 1, 2, 3
    view = model.step(batch, cache)
    gathered = model.step(replace(batch, decode_first_slot=None), cache)
    assert (view - gathered).abs().max().item() < 1e-6
    assert [h.batch.decode_first_slot for h in halves(batch)] == [1, 3]
