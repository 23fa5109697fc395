"""Fast inference layouts: int8 quantization error, greedy parity and perplexity on a model
trained for a few seconds on tiny Shakespeare (random weights have near-tied logits, so
parity on them would test luck), compile with its fallback, and the CLI flags."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import gptkit.inference
import gptkit.kernels.int8
import gptkit.kernels.linear
import gptkit.kernels.ops
from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.generate import cache_size, generate
from gptkit.inference import GuardedStep, optimize_for_inference
from gptkit.kernels.int4 import Int4Linear, dequantize_groups, quantize_groups
from gptkit.kernels.int8 import quantize_per_channel
from gptkit.kernels.linear import OneDnnLinear, RowLinear, TiledLinear
from gptkit.kernels.ops import masked_attention
from gptkit.kernels.rowwise import rowwise_matmul, tile_weight, tiled_matmul
from gptkit.model import GPT

BLOCK = 64
PROMPTS = ["ROMEO:\nWhat ", "First Citizen:\nWe ", "KING HENRY:\nThe "]


@pytest.fixture(scope="module")
def shakespeare(repo_data) -> tuple[GPT, dict[str, int], torch.Tensor]:
    """(a char-level GPT trained 150 steps, its vocabulary, held-out token ids)."""
    text = (repo_data / "shakespeare" / "input.txt").read_text()
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([vocab[c] for c in text[:300_000]])
    train, held_out = ids[:-8_000], ids[-8_000:]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=BLOCK, n_layer=2, n_head=4,
                          n_embd=64, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: thread handoffs would cost more than they save
    for _ in range(150):
        starts = torch.randint(0, len(train) - BLOCK - 1, (12,))
        x = torch.stack([train[s:s + BLOCK] for s in starts])
        y = torch.stack([train[s + 1:s + BLOCK + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval(), vocab, held_out


def perplexity(model: GPT, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        x = ids[:len(ids) // BLOCK * BLOCK].view(-1, BLOCK)
        logits = model(x[:, :-1]).float()
        return math.exp(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item())


def greedy(model: GPT, vocab: dict[str, int], prompt: str, new: int = 40) -> list[int]:
    ids = torch.tensor([[vocab[c] for c in prompt]])
    return generate(model, ids, max_new_tokens=new, eos_token_id=None)[0].tolist()


def test_per_channel_rounding_error_is_at_most_half_a_step():
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different size
    q, scales = quantize_per_channel(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


def test_int8_keeps_greedy_output_and_perplexity(shakespeare):
    model, vocab, held_out = shakespeare
    int8 = optimize_for_inference(copy.deepcopy(model), quantize="int8")
    for prompt in PROMPTS:
        assert greedy(int8, vocab, prompt) == greedy(model, vocab, prompt)
    base, quantized = perplexity(model, held_out), perplexity(int8, held_out)
    assert base < 20  # the model did learn: a uniform guess scores ~65
    assert quantized < base * 1.01


def test_int4_groups_round_to_half_a_step_and_the_kernel_computes_their_product():
    w = torch.randn(40, 96) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different size
    codes, steps, minima = quantize_groups(w)
    assert codes.shape == w.shape and int(codes.min()) == 0 and int(codes.max()) == 15
    error = (dequantize_groups(codes, steps, minima) - w).abs().view(40, 3, 32)
    assert (error <= steps[..., None] / 2 + 1e-6).all()
    x = torch.randn(5, 96)
    reference = x @ dequantize_groups(codes, steps, minima).t()
    fp32 = Int4Linear.quantized(w, None, torch.float32)
    assert torch.allclose(fp32(x), reference, atol=1e-4 * reference.abs().max())
    bf16 = Int4Linear.quantized(w, None, torch.bfloat16)  # bf16 activations, steps and offsets
    assert torch.allclose(bf16(x), reference, atol=2e-2 * reference.abs().max())


def test_int4_costs_little_perplexity_and_mostly_keeps_greedy_tokens(shakespeare):
    model, vocab, held_out = shakespeare
    int4 = optimize_for_inference(copy.deepcopy(model), quantize="int4")
    assert isinstance(int4.transformer.h[0].mlp.c_fc, Int4Linear)
    base, quantized = perplexity(model, held_out), perplexity(int4, held_out)
    assert quantized < base * 1.02  # measured: within 0.3% either way
    same = sum(a == b for prompt in PROMPTS
               for a, b in zip(greedy(int4, vocab, prompt), greedy(model, vocab, prompt),
                               strict=True))
    assert same >= 0.8 * sum(len(greedy(model, vocab, prompt)) for prompt in PROMPTS)


def test_int4_needs_groups_of_32_inputs():
    with pytest.raises(GptkitError, match="groups of 32 inputs, but a layer of this model has 48"):
        Int4Linear.quantized(torch.randn(8, 48), None, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_layouts_keep_perplexity(shakespeare, dtype):
    model, vocab, held_out = shakespeare
    fast = optimize_for_inference(copy.deepcopy(model), dtype=dtype)
    assert perplexity(fast, held_out) < perplexity(model, held_out) * 1.01
    if dtype == torch.float32:  # the same arithmetic in another layout: the same tokens
        for prompt in PROMPTS:
            assert greedy(fast, vocab, prompt) == greedy(model, vocab, prompt)


def test_weights_packed_for_a_serving_batch_keep_logits_and_tokens(shakespeare):
    """A serving engine's layout (fp32 weights packed for products of 8 rows) gives the
    plain model's logits on a batch of rows and its greedy tokens on one."""
    model, vocab, held_out = shakespeare
    packed = optimize_for_inference(copy.deepcopy(model), batch_size=8)
    assert isinstance(packed.lm_head, OneDnnLinear)
    assert isinstance(packed.transformer.h[0].mlp.c_fc, OneDnnLinear)
    rows = held_out[:8 * 32].view(8, 32)
    with torch.inference_mode():
        assert torch.allclose(packed(rows), model(rows), atol=1e-4, rtol=1e-4)
    for prompt in PROMPTS:
        assert greedy(packed, vocab, prompt) == greedy(model, vocab, prompt)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_compiled_step_equals_eager(shakespeare, exported_decode, quantize):
    model, vocab, _ = shakespeare
    eager = optimize_for_inference(copy.deepcopy(model), quantize=quantize)
    compiled = optimize_for_inference(copy.deepcopy(model), compile=True, quantize=quantize)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback happened
        assert greedy(compiled, vocab, PROMPTS[0], 20) == greedy(eager, vocab, PROMPTS[0], 20)
    assert compiled.compiled_decode.runner.calls == 19


def test_one_compiled_step_serves_every_length(shakespeare, exported_decode):
    model, vocab, _ = shakespeare
    compiled = optimize_for_inference(copy.deepcopy(model), compile=True)
    # the ahead-of-time step is dynamic in the number of slots: caches hold what they need
    assert [cache_size(n, compiled) for n in (5, 17, BLOCK)] == [5, 17, BLOCK]
    # a step for fixed shapes (CUDA graphs) gets a power of two, at most the shortest context
    graphs = copy.deepcopy(model)
    graphs.compiled_decode = GuardedStep(graphs, None)
    assert [cache_size(n, graphs) for n in (5, 16, 17, 33, BLOCK)] == [8, 16, 32, 64, BLOCK]
    short = GPT(GPTConfig(**{**model.config.to_dict(), "block_size": 48}))
    assert cache_size(40, model, short) == 40 and cache_size(40, graphs, short) == 48
    ids = torch.tensor([[vocab[c] for c in PROMPTS[2]]])  # 16 characters
    draft = optimize_for_inference(copy.deepcopy(model), compile=True)
    calls = [dict(max_new_tokens=4), dict(max_new_tokens=9), dict(max_new_tokens=16),
             dict(max_new_tokens=6, num_beams=2), dict(max_new_tokens=12, draft_model=draft)]
    for kwargs in calls:  # three lengths, then two beam rows (eager), then with a draft
        want = generate(model, ids, eos_token_id=None, **kwargs)
        assert torch.equal(generate(compiled, ids, eos_token_id=None, **kwargs), want), kwargs
    assert compiled.compiled_decode.runner.calls == 3 + 8 + 15 + 0 + 0  # one-row steps
    assert draft.compiled_decode.runner.calls > 0


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_rowwise_matmul_compiled_by_inductor_is_the_matmul(weight_dtype):
    torch.manual_seed(0)
    weight = (torch.randn(40, 96) * 30).to(weight_dtype)  # int8: whole numbers up to ~±100
    reference = torch.compile(rowwise_matmul, fullgraph=True, dynamic=False)
    for rows in (1, 3):  # one accumulator per input row
        x = torch.randn(rows, 96)
        expected = x @ weight.float().t()
        assert torch.allclose(reference(x, weight), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("out_features", [48, 45])  # whole tiles, and a zero-padded last tile
def test_tiled_matmul_is_the_matmul_eager_and_compiled(out_features):
    torch.manual_seed(0)
    weight = torch.randn(out_features, 96)
    tiles = tile_weight(weight)
    assert tiles.shape == (3, 96, 16)
    assert torch.equal(tiles[1, 5], weight[16:32, 5])  # tile 1 holds features 16-31
    assert not tiles[2, :, out_features - 32:].any()
    compiled = torch.compile(tiled_matmul, fullgraph=True, dynamic=False)
    # decode rows (compiled: fused), a prompt's (batched GEMM over the tiles), and every
    # logit of a long prompt (one GEMM over the untiled weight)
    for rows in (1, 3, 20, 300):
        x = torch.randn(rows, 96)
        expected = x @ weight.t()
        for product in (tiled_matmul, compiled):
            got = product(x, tiles)
            assert got.shape == (rows, 48)
            assert torch.allclose(got[:, :out_features], expected, rtol=1e-5, atol=1e-4)


def test_the_compiled_head_reads_a_cheap_norm_from_memory():
    # Inductor inlines cheap producers into their consumers: unchecked, the head's loop over
    # its weights would redo a parameter-free RMSNorm's square root for every weight element.
    weight = torch.randn(48, 96)
    tiles = tile_weight(weight)
    head = torch.compile(lambda x: tiled_matmul(F.rms_norm(x, (96,), eps=1e-6), tiles),
                         fullgraph=True, dynamic=False)
    x = torch.randn(1, 96)
    got, (code,) = run_and_get_code(head, x)
    expected = F.rms_norm(x, (96,), eps=1e-6) @ weight.t()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)
    wrapper = code[code.index("def call("):]
    after = wrapper[wrapper.index("torch.ops.gptkit.realize.default("):]
    products = re.findall(r"(cpp_fused\w+)\(", after)
    assert products
    for name in products:
        kernel = code[code.index(f"{name} = "):].split("'''")[1]  # its C++ source
        assert "sqrt" not in kernel


def test_masked_attention_is_sdpa_with_the_mask():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 1, 8, dtype=torch.float64)  # one new token over 10 cache slots
    k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(2, 1, 1, 10) < 0.6
    mask[..., 4] = True  # every row sees at least one slot, as its own always is
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(masked_attention(q, k, v, mask), expected, atol=1e-12)


@pytest.mark.parametrize("settings", [{}, {"quantize": "int8"}])
def test_inductor_decode_step_gives_the_eager_tokens(shakespeare, settings, monkeypatch, tmp_path):
    # The real compiler (AOTInductor), so the products run as generated C++.
    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(tmp_path))
    model, vocab, _ = shakespeare
    traced = []  # (what, rows) per traced call, recorded while the step is exported

    def spy(name, product):
        def recorded(flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_compiling():
                traced.append((name, flat.size(0)))
            return product(flat, weight)
        return recorded

    def attention_spy(q, k, v, attn_mask, scale=None):
        traced.append(("attention", q.size(2)))
        return masked_attention(q, k, v, attn_mask, scale)

    monkeypatch.setattr(gptkit.kernels.linear, "rowwise_matmul", spy("rowwise", rowwise_matmul))
    monkeypatch.setattr(gptkit.kernels.int8, "rowwise_matmul", spy("rowwise", rowwise_matmul))
    monkeypatch.setattr(gptkit.kernels.linear, "tiled_matmul", spy("tiled", tiled_matmul))
    monkeypatch.setattr(gptkit.kernels.ops, "masked_attention", attention_spy)
    eager = optimize_for_inference(copy.deepcopy(model), **settings)
    compiled = optimize_for_inference(copy.deepcopy(model), compile=True, **settings)
    assert isinstance(compiled.transformer.h[0].mlp.c_fc, RowLinear) == (not settings)
    assert isinstance(compiled.lm_head, TiledLinear) == (not settings)
    # Every linear layer of the blocks (4 per block) became a row-wise product over the
    # step's one row, attention was written out for its one query, and the head is tiled
    # in fp32, row-wise in int8.
    head = ("rowwise", 1) if settings else ("tiled", 1)
    block = [("rowwise", 1), ("attention", 1), ("rowwise", 1), ("rowwise", 1), ("rowwise", 1)]
    assert traced == block * model.config.n_layer + [head]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback happened
        assert greedy(compiled, vocab, PROMPTS[0], 20) == greedy(eager, vocab, PROMPTS[0], 20)
    assert compiled.compiled_decode.runner is not None
    assert len(list(tmp_path.glob("decode/*.pt2"))) == 1


def test_compile_failure_falls_back_to_eager_with_a_warning_once(shakespeare, monkeypatch,
                                                                 tmp_path):
    from gptkit.kernels import aot

    monkeypatch.setenv("GPTKIT_CACHE_DIR", str(tmp_path))
    model, vocab, _ = shakespeare
    attempts = []

    def broken(model, package):
        attempts.append(package)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(aot, "_compile", broken)
    for _ in range(2):  # the second load remembers the failure instead of trying again
        with pytest.warns(UserWarning, match="could not compile the decode step .*no compiler"):
            fast = optimize_for_inference(copy.deepcopy(model), compile=True)
        assert fast.compiled_decode is None
    assert len(attempts) == 1
    assert greedy(fast, vocab, PROMPTS[1]) == greedy(model, vocab, PROMPTS[1])


def test_a_damaged_compiled_step_is_compiled_afresh(shakespeare, exported_decode, monkeypatch):
    from gptkit.kernels import aot

    model, vocab, _ = shakespeare

    def damaged(package, model):
        raise RuntimeError("not a zip archive")

    monkeypatch.setattr(aot, "_open", damaged)
    with pytest.warns(UserWarning, match="not a zip archive"):
        fast = optimize_for_inference(copy.deepcopy(model), compile=True)
    assert fast.compiled_decode is None
    assert not list(aot.cache_dir().glob("decode/*.pt2"))  # removed: rebuilt next time


def test_a_compiled_step_that_fails_when_run_falls_back(shakespeare):
    from gptkit.kernels.aot import CompiledStep

    class Broken:
        def boxed_run(self, inputs):
            return 1 / 0

    model, vocab, _ = shakespeare
    fast = optimize_for_inference(copy.deepcopy(model))
    fast.compiled_decode = CompiledStep(fast, Broken())
    with pytest.warns(UserWarning, match="ZeroDivisionError"):
        assert greedy(fast, vocab, PROMPTS[2]) == greedy(model, vocab, PROMPTS[2])
    assert fast.compiled_decode.runner is None  # warned once, eager from then on


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=torch.float16), "dtype must be"),
    (dict(quantize="int3"), "quantize must be"),
])
def test_bad_settings_are_one_sentence_errors(shakespeare, kwargs, match):
    with pytest.raises(GptkitError, match=match):
        optimize_for_inference(copy.deepcopy(shakespeare[0]), **kwargs)
