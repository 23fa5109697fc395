"""The continuous-batching engine on its own: rows join and leave between steps, chunked
prefill, per-request sampling and seeds, eos, queue limits, cancellation."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import TEXT, collect, make_model_dir, offline, request, serve_all

from gptkit.generate import generate
from gptkit.inference import load_for_inference
from gptkit.serve.engine import Engine, GenerationRequest, QueueFull


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("engine") / "tiny", block_size=128)


@pytest.fixture
def loaded(model_dir):
    return load_for_inference(model_dir, "cpu")  # a fresh copy: an engine owns its model


def staggered(tokenizer, model_dir, count: int) -> tuple[list, list]:
    """`count` greedy requests whose prompts (3 to 18 tokens) and lengths differ, so rows
    join and leave at different steps, and what each must give: `generate`'s text alone."""
    prompts = [TEXT[i:i + 3 + 5 * (i % 4)] for i in range(count)]
    lengths = [5 + 7 * (i % 3) for i in range(count)]
    pairs = [request(tokenizer, p, n, temperature=0) for p, n in zip(prompts, lengths, strict=True)]
    return pairs, [(offline(model_dir, p, n), "length", n)
                   for p, n in zip(prompts, lengths, strict=True)]


def test_rows_join_and_leave_and_match_offline_greedy(loaded, model_dir):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=3, max_queue=16, prefill_chunk=4)
    pairs, expected = staggered(tokenizer, model_dir, 10)
    assert serve_all(engine, pairs) == expected
    stats = engine.stats()
    assert stats["completed"] == 10 and stats["active"] == stats["queued"] == 0
    assert stats["decode_steps"] < sum(r.max_new_tokens for r, _ in pairs) * 0.5  # shared passes


def test_prompts_joining_together_share_one_prefill_pass(loaded, model_dir, monkeypatch):
    """Joining prompts of different lengths (padded), in rows that are not adjacent (copied
    out of the cache and back), a prompt split across steps by the budget: every text is
    still exactly the greedy text of the prompt alone."""
    model, tokenizer = loaded
    prefills = []  # rows of each forward pass over more than one token per row
    hidden_states = model.hidden_states

    def counted(idx, *args, **kwargs):
        if idx.size(1) > 1:
            prefills.append(idx.size(0))
        return hidden_states(idx, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", counted)
    engine = Engine(model, tokenizer, max_batch_size=6, max_queue=16, prefill_chunk=40)
    # six short prompts fill the rows at once; rows 1 and 4 finish first, and the two
    # waiting prompts (12 and 33 tokens) join them together; the last one waits longer
    prompts = [TEXT[i:i + 3 + i] for i in range(6)] + [TEXT[5:17], TEXT[20:53], TEXT[:70]]
    lengths = [12, 3, 12, 12, 3, 12, 6, 6, 5]
    pairs = [request(tokenizer, p, n, temperature=0) for p, n in zip(prompts, lengths, strict=True)]
    results = serve_all(engine, pairs)
    assert results == [(offline(model_dir, p, n), "length", n)
                       for p, n in zip(prompts, lengths, strict=True)]
    assert prefills[:2] == [6, 2]  # the first six rows in one pass, then rows 1 and 4
    assert len(prefills) < len(prompts)


def test_a_cache_gathers_rows_that_are_not_adjacent_and_scatters_them_back():
    import torch

    from gptkit.model import KVCache

    full = KVCache.empty(4, 1, 6, 2, torch.float32, "cpu")
    rows = torch.tensor([0, 2])
    part = full.gather(rows, 4)
    part.update(torch.arange(4), torch.ones(2, 1, 4, 2), torch.full((2, 1, 4, 2), 2.0))
    assert full.k.sum() == 0  # a copy: the cache changes only when it goes back
    full.scatter(rows, part)
    assert full.k[rows, :, :4].eq(1).all() and full.v[rows, :, :4].eq(2).all()
    assert full.k[[1, 3]].sum() == full.k[:, :, 4:].sum() == 0


def test_each_request_samples_with_its_own_seed(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode("hello", return_tensors="pt")
    reference = generate(model, ids, max_new_tokens=20, do_sample=True, temperature=1.3,
                         top_p=0.9, seed=11, tokenizer=tokenizer)
    expected = tokenizer.decode(reference[0, ids.size(1):].tolist())
    engine = Engine(model, tokenizer, max_batch_size=4)
    engine.start()
    try:
        pairs = [request(tokenizer, "hello", 20, temperature=1.3, top_p=0.9, seed=11),
                 request(tokenizer, "hello", 20, temperature=0),
                 request(tokenizer, "hello", 20, temperature=1.3, top_p=0.9, seed=11),
                 request(tokenizer, "hello", 20, temperature=1.3, seed=12)]
        engine.submit([r for r, _ in pairs])
        texts = [collect(inbox)[0] for _, inbox in pairs]
    finally:
        engine.close()
    assert texts[0] == texts[2] == expected  # same seed, same text, whatever shares the batch
    assert texts[3] != texts[0]


def test_eos_ends_a_request_without_text(loaded, model_dir):
    model, tokenizer = loaded
    first = tokenizer.encode(offline(model_dir, "fox", 1))[0]
    engine = Engine(model, tokenizer, eos_token_id=first)  # the next token will be "eos"
    engine.start()
    try:
        req, inbox = request(tokenizer, "fox", 10, temperature=0)
        engine.submit([req])
        assert collect(inbox) == ("", "stop", 1)
    finally:
        engine.close()


def test_queue_limit_and_cancel(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=2)  # not started yet
    pairs = [request(tokenizer, "abc", 5, temperature=0) for _ in range(4)]
    engine.submit([r for r, _ in pairs[:2]])
    with pytest.raises(QueueFull):
        engine.submit([r for r, _ in pairs[2:]])  # all or none: 1 row + 2 queue places
    engine.submit([pairs[2][0]])
    pairs[1][0].cancel()
    engine.start()
    try:
        assert collect(pairs[0][1])[1] == "length" and collect(pairs[2][1])[1] == "length"
        assert pairs[1][1].empty()
        assert engine.stats()["cancelled"] == 1
    finally:
        engine.close()


def test_a_failing_sink_cancels_only_its_request(loaded):
    model, tokenizer = loaded

    def broken(event):
        raise RuntimeError("client gone")

    engine = Engine(model, tokenizer, max_batch_size=2)
    engine.start()
    try:
        good, inbox = request(tokenizer, "hello", 30, temperature=0)
        engine.submit([GenerationRequest(tokenizer.encode("fox"), 30, broken), good])
        assert collect(inbox)[1] == "length"
        assert engine.stats()["cancelled"] == 1
    finally:
        engine.close()


def test_close_fails_waiting_requests(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=1)
    req, inbox = request(tokenizer, "abc", 5)
    engine.submit([req])
    engine.close()
    assert "shutting down" in collect(inbox)[1]
    with pytest.raises(QueueFull):
        engine.submit([req])


def test_one_row_decodes_through_the_compiled_step_on_a_view_of_the_pool(model_dir,
                                                                          exported_decode):
    # One request at a time: each step's cache is the first slots of a row of the engine's
    # pool (a strided view), which the compiled program reads and writes in place.
    model, tokenizer = load_for_inference(model_dir, "cpu", compile=True)
    prompts, lengths = [TEXT[:5], TEXT[7:20]], [9, 70]  # the second crosses a slot block
    for prompt, n in zip(prompts, lengths, strict=True):
        engine = Engine(model, tokenizer, max_batch_size=3, max_queue=16, prefill_chunk=4)
        [result] = serve_all(engine, [request(tokenizer, prompt, n, temperature=0)])
        assert result == (offline(model_dir, prompt, n), "length", n)
    # every token: the engine feeds the last prompt token in with the first decode step
    assert model.compiled_decode.runner.calls == sum(lengths)


def test_serving_layout_runs_one_row_compiled_and_batches_packed(model_dir, exported_decode):
    # As `gptkit serve` loads on CPU by default: the compiled one-row step over the plain
    # weights, and a packed copy for the steps and prefills over several rows.
    from gptkit.inference import load_directory
    from gptkit.kernels.linear import RowLinear, TiledLinear

    model, tokenizer = load_directory(model_dir, "cpu", compile=True, batch_size=3)
    assert isinstance(model.lm_head, TiledLinear) and model.lm_head.packed is not None
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, RowLinear) and layer.packed is not None
    x = torch.randn(5, layer.weight.size(1))
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                               rtol=1e-4, atol=1e-4)
    engine = Engine(model, tokenizer, max_batch_size=3, max_queue=16, prefill_chunk=4)
    pairs, expected = staggered(tokenizer, model_dir, 6)
    assert serve_all(engine, pairs) == expected
    # the compiled program took the steps of one row only, the packed layers the rest
    assert 0 < model.compiled_decode.runner.calls < engine.stats()["decode_steps"]


def test_the_pool_is_zeroed_only_as_far_as_attention_reads_it(loaded, model_dir):
    # The pool is allocated uninitialized; NaN is the worst that memory may hold there.
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=3, max_queue=16, prefill_chunk=4)
    with torch.inference_mode():
        for full in engine._full_caches:
            full.k.fill_(float("nan"))
            full.v.fill_(float("nan"))
    pairs, expected = staggered(tokenizer, model_dir, 6)
    assert serve_all(engine, pairs) == expected
    assert max(engine._cleared) == 64 < engine.context  # one block of slots was ever read
    assert bool(engine._full_caches[0].k[:, :, 64:].isnan().all())  # the rest never touched
