"""Generation: parity with transformers' `generate`, sampling invariants, batching, stopping,
streaming, context handling, argument errors, beam search and speculative decoding.

Models are tiny and random; their 2-D weights get a wide init (std 0.3) because GPT-2's
0.02 makes a tied-embedding model repeat one token forever, which would make parity
tests pass trivially.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.generate import Sampling, generate, sample_next, stream_generate
from gptkit.model import GPT

VOCAB = 257  # 256 bytes + end of text
EOS = 256


def _widen(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def tiny_gpt(seed: int = 0, n_layer: int = 2, block_size: int = 64) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=VOCAB, block_size=block_size, n_layer=n_layer, n_head=2,
                       n_embd=32, eos_token_id=EOS)
    return _widen(GPT(config))


class ByteTokenizer:
    """Byte-level stand-in: one token per UTF-8 byte, so CJK characters span 3 tokens."""

    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class CharTokenizer:
    """Every id is its own CJK character, so any generated ids decode to distinct text."""

    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 0x4E00 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(0x4E00 + i) for i in ids)


class ScriptedModel(nn.Module):
    """Predicts token `script[position + 1]` whatever the context: a model with known output."""

    def __init__(self, script: list[int], vocab_size: int = VOCAB) -> None:
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, block_size=128, n_layer=1, n_head=1,
                                n_embd=8, eos_token_id=script[-1])
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab_size, 8),
                                              h=nn.ModuleList()))
        self.script = torch.tensor(script)

    kv_caches: list[None] = []
    compiled_decode = None
    device = torch.device("cpu")

    @property
    def token_limit(self) -> int:
        return self.config.vocab_size

    def setup_cache(self, *args: object) -> None:
        pass

    def forward(self, idx: torch.Tensor, *, position_ids: torch.Tensor, **kwargs: object
                ) -> torch.Tensor:
        nxt = self.script[(position_ids + 1).clamp(max=len(self.script) - 1)]
        return F.one_hot(nxt.expand(idx.shape), self.config.vocab_size).float()


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_gpt()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[GPT, nn.Module]]:
    """(gptkit, transformers) models with equal weights, converted in both directions."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("hf")
    ours = tiny_gpt(seed=1)
    ours.save_pretrained(root / "ours")
    torch.manual_seed(2)
    theirs = _widen(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32,
                                               n_layer=2, n_head=2, eos_token_id=EOS,
                                               bos_token_id=EOS)))
    theirs.save_pretrained(root / "theirs")
    return {
        "gptkit->hf": (ours, AutoModelForCausalLM.from_pretrained(root / "ours").eval()),
        "hf->gptkit": (GPT.from_pretrained(root / "theirs"), theirs),
    }


def hf_generate(hf: nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    eos = kwargs.pop("eos_token_id", EOS)
    eos = None if eos == [] else eos
    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       eos_token_id=eos, pad_token_id=EOS if eos is None else eos, **kwargs)


PROMPTS = [[5], [17, 200, 3, 99, 42], list(range(40, 60))]


# -- parity with transformers ----------------------------------------------------------------

@pytest.mark.parametrize("direction", ["gptkit->hf", "hf->gptkit"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers(hf_pair, direction, prompt):
    ours, hf = hf_pair[direction]
    ids = torch.tensor([prompt])
    free = generate(ours, ids, max_new_tokens=25, eos_token_id=[])
    assert free.tolist() == hf_generate(hf, ids, max_new_tokens=25, eos_token_id=[]).tolist()
    eos = free[0, len(prompt) + 6].item()  # a token the model does produce: it stops there
    ended = generate(ours, ids, max_new_tokens=25, eos_token_id=eos)
    assert ended.tolist() == hf_generate(hf, ids, max_new_tokens=25, eos_token_id=eos).tolist()
    assert ended.size(1) <= len(prompt) + 7 and ended[0, -1] == eos


@pytest.mark.parametrize("direction", ["gptkit->hf", "hf->gptkit"])
def test_repetition_penalty_matches_transformers(hf_pair, direction):
    ours, hf = hf_pair[direction]
    for prompt in PROMPTS[1:]:
        ids = torch.tensor([prompt])
        for penalty in (1.5, 0.7):
            out = generate(ours, ids, max_new_tokens=20, repetition_penalty=penalty)
            expected = hf_generate(hf, ids, max_new_tokens=20, repetition_penalty=penalty)
            assert out.tolist() == expected.tolist()


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,returned", [
    (2, 1.0, False, 1), (3, 1.0, True, 3), (4, 0.5, False, 2), (3, 2.0, "never", 2),
    (4, -1.0, True, 1),
])
def test_beam_search_matches_transformers(hf_pair, num_beams, length_penalty, early_stopping,
                                          returned):
    ours, hf = hf_pair["gptkit->hf"]
    ids = torch.tensor([PROMPTS[1]])
    greedy = generate(ours, ids, max_new_tokens=15, eos_token_id=[])
    for eos in ([], greedy[0, 8].item(), greedy[0, 12].item()):
        kwargs = dict(max_new_tokens=15, num_beams=num_beams, length_penalty=length_penalty,
                      early_stopping=early_stopping, num_return_sequences=returned,
                      eos_token_id=eos)
        out = generate(ours, ids, **kwargs)
        assert out.tolist() == hf_generate(hf, ids, **kwargs).tolist(), eos


def test_beam_search_batch_with_padding_matches_transformers(hf_pair):
    ours, hf = hf_pair["hf->gptkit"]
    ids = torch.tensor([[EOS, EOS, 7, 8, 9], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    eos = generate(ours, ids[1:], max_new_tokens=10)[0, 9].item()
    kwargs = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, eos_token_id=eos,
                  pad_token_id=eos)
    out = generate(ours, ids, attention_mask=mask, **kwargs)
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    assert out.tolist() == expected.tolist()


# -- sampling ------------------------------------------------------------------------------

def test_sampling_is_reproducible_and_seed_dependent(model):
    ids = torch.tensor([PROMPTS[1]])
    a = generate(model, ids, max_new_tokens=30, do_sample=True, seed=1)
    b = generate(model, ids, max_new_tokens=30, do_sample=True, seed=1)
    c = generate(model, ids, max_new_tokens=30, do_sample=True, seed=2)
    d = generate(model, ids, max_new_tokens=30, do_sample=True,
                 generator=torch.Generator().manual_seed(1))
    assert a.tolist() == b.tolist() == d.tolist()
    assert a.tolist() != c.tolist()


@pytest.mark.parametrize("settings", [
    dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5,
                                                                 temperature=0.7),
])
def test_degenerate_sampling_is_greedy(model, settings):
    ids = torch.tensor([PROMPTS[2]])
    greedy = generate(model, ids, max_new_tokens=20)
    assert generate(model, ids, max_new_tokens=20, do_sample=True, seed=3,
                    **settings).tolist() == greedy.tolist()


@pytest.mark.parametrize("settings,expected", [
    (dict(), F.softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]), -1)),
    (dict(temperature=0.5), F.softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]) / 0.5, -1)),
    (dict(top_k=2), F.softmax(torch.tensor([2.0, 1.0]), -1)),
    # top_p=0.8 keeps the fewest most likely tokens holding >= 80% of the mass: 3 here.
    (dict(top_p=0.8), F.softmax(torch.tensor([2.0, 1.0, 0.5]), -1)),
])
def test_sampling_follows_the_softmax(settings, expected):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    draws = sample_next(logits.expand(n, -1), Sampling(do_sample=True,
                                                        generator=torch.Generator().manual_seed(0),
                                                        **settings))
    freq = torch.bincount(draws, minlength=6).float() / n
    expected = F.pad(expected, (0, 6 - len(expected)))
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_sampling_first_token_of_the_model_follows_its_softmax(model):
    ids = torch.tensor([PROMPTS[1]])
    probs = F.softmax(model(ids)[0, -1].detach(), -1)
    n = 4000
    out = generate(model, ids.expand(n, -1), max_new_tokens=1, do_sample=True, seed=0)
    freq = torch.bincount(out[:, -1], minlength=VOCAB).float() / n
    assert (freq - probs).abs().max() < 0.03


# -- batching, stopping ----------------------------------------------------------------------

def test_left_padded_batch_equals_one_at_a_time(model):
    prompts = [[3, 4], PROMPTS[1], PROMPTS[2], [250]]
    width = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    eos = generate(model, torch.tensor([prompts[1]]), max_new_tokens=8, eos_token_id=[])[0, -1]
    pad = 255
    out = generate(model, ids, attention_mask=mask, max_new_tokens=20, num_return_sequences=2,
                   eos_token_id=eos.item(), pad_token_id=pad)
    assert out.size(0) == 2 * len(prompts)
    new_tokens = []
    for i, prompt in enumerate(prompts):
        single = generate(model, torch.tensor([prompt]), max_new_tokens=20,
                          eos_token_id=eos.item())[0]
        new_tokens.append(len(single) - len(prompt))
        for row in out[2 * i:2 * i + 2]:
            start = width - len(prompt)
            assert row[start:start + len(single)].tolist() == single.tolist()
            assert (row[start + len(single):] == pad).all()
    assert out.size(1) == width + max(new_tokens)


def test_eos_ends_rows_and_pads_them(model):
    ids = torch.tensor([PROMPTS[1], [9, 8, 7, 6, 5]])
    free = generate(model, ids, max_new_tokens=20, eos_token_id=[])
    eos = free[0, 5 + 3].item()  # row 0 ends at its 4th new token (or earlier)
    out = generate(model, ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    first = out[0, 5:].tolist().index(eos)
    assert (out[0, 5 + first + 1:] == 0).all()
    row1 = free[1, 5:].tolist()
    if eos in row1:  # generation ends when the last row does
        assert out.size(1) == 5 + max(first, row1.index(eos)) + 1
    else:
        assert out[1].tolist() == free[1].tolist()


def test_generation_ends_when_all_rows_have(model):
    ids = torch.tensor([PROMPTS[1]])
    free = generate(model, ids, max_new_tokens=20, eos_token_id=[])
    eos = free[0, 7].item()
    out = generate(model, ids.expand(3, -1), max_new_tokens=20, eos_token_id=eos)
    assert out.size(1) == free[0].tolist().index(eos, 5) + 1


def test_stop_strings_end_rows_and_keep_the_stop_text(model):
    tok = CharTokenizer()
    ids = torch.tensor([PROMPTS[1], [9, 8, 7, 6, 5]])
    free = generate(model, ids, max_new_tokens=20, eos_token_id=[])
    stop = tok.decode(free[0, 9:11].tolist())  # new tokens 5 and 6 of row 0
    out = generate(model, ids, max_new_tokens=20, eos_token_id=[], pad_token_id=EOS,
                   stop=[stop, "never-generated"], tokenizer=tok)
    text0 = tok.decode(out[0, 5:].tolist()).rstrip(tok.decode([EOS]))
    assert text0.endswith(stop) and text0.count(stop) == 1
    assert out[0, :len(text0) + 5].tolist() == free[0, :len(text0) + 5].tolist()
    row1 = tok.decode(free[1, 5:].tolist())
    if stop not in row1:
        assert out.size(1) == 25 and out[1].tolist() == free[1].tolist()


# -- streaming -----------------------------------------------------------------------------

@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer()], ids=["bytes", "chars"])
def test_stream_pieces_join_to_the_generated_text(model, tok):
    prompt = tok.decode([97, 98])
    pieces = list(stream_generate(model, tok, prompt, max_new_tokens=40))
    out = generate(model, torch.tensor([[97, 98]]), max_new_tokens=40)[0, 2:].tolist()
    if EOS in out:
        out = out[:out.index(EOS)]
    assert "".join(pieces) == tok.decode(out)
    assert len(pieces) > 1


def test_stream_does_not_split_multibyte_characters():
    text = "你好，世界! Ünïcode ok"
    tok = ByteTokenizer()
    prompt = "> "
    model = ScriptedModel(tok.encode(prompt + text) + [EOS])
    pieces = list(stream_generate(model, tok, prompt, max_new_tokens=100))
    assert "".join(pieces) == text
    assert len(pieces) > 5 and not any("\ufffd" in p for p in pieces)


def test_stream_with_gptkit_bpe_tokenizer_keeps_characters_whole():
    tokenizer_module = pytest.importorskip("gptkit.tokenizer")
    text = "春眠不觉晓，处处闻啼鸟。 The end."
    tok = tokenizer_module.Tokenizer.train(texts=[text * 3, "hello world"], vocab_size=280)
    ids = tok.encode("> " + text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some characters span tokens
    model = ScriptedModel([*ids, tok.eos_token_id], tok.vocab_size)
    pieces = list(stream_generate(model, tok, "> ", max_new_tokens=100))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stream_stops_before_a_stop_string():
    tok = ByteTokenizer()
    model = ScriptedModel(tok.encode("Q: hi\nA: hello there\nQ: more") + [EOS])
    pieces = list(stream_generate(model, tok, "Q: hi\n", max_new_tokens=100, stop=["\nQ:"]))
    assert "".join(pieces) == "A: hello there"
    ids = generate(model, torch.tensor([tok.encode("Q: hi\n")]), max_new_tokens=100,
                   stop=["\nQ:"], tokenizer=tok)
    assert tok.decode(ids[0].tolist()) == "Q: hi\nA: hello there\nQ:"  # as transformers does


def test_stream_can_be_abandoned_and_restores_the_model(model):
    it = stream_generate(model, ByteTokenizer(), "ab", max_new_tokens=30)
    next(it)
    assert model.transformer.h[0].attn.kv_cache is not None
    it.close()
    assert model.transformer.h[0].attn.kv_cache is None


# -- model state ---------------------------------------------------------------------------

def test_model_cache_and_mode_are_restored(model):
    fresh = tiny_gpt()
    fresh.train()
    fresh.setup_cache(1, 8)
    before = [b.attn.kv_cache for b in fresh.transformer.h]
    out = fresh.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=5)
    assert out.tolist() == generate(model, torch.tensor([PROMPTS[1]]), max_new_tokens=5).tolist()
    assert fresh.training and [b.attn.kv_cache for b in fresh.transformer.h] == before

    def boom(tokens: torch.Tensor) -> None:
        raise RuntimeError("streamer failed")

    with pytest.raises(RuntimeError):
        generate(fresh, torch.tensor([[1]]), max_new_tokens=5, streamer=boom)
    assert fresh.training and [b.attn.kv_cache for b in fresh.transformer.h] == before


def test_streamer_receives_each_step(model):
    seen: list[list[int]] = []
    out = generate(model, torch.tensor([PROMPTS[1]] * 2), max_new_tokens=6,
                   streamer=lambda t: seen.append(t.tolist()))
    assert torch.tensor(seen).t().tolist() == out[:, 5:].tolist()


# -- context -------------------------------------------------------------------------------

def test_long_prompt_is_cut_from_the_left_with_a_warning(model):
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="dropped its first 16 tokens"):
        out = generate(model, ids, max_new_tokens=10, eos_token_id=[])
    assert out.tolist() == generate(model, ids[:, -54:], max_new_tokens=10,
                                    eos_token_id=[]).tolist()
    with pytest.warns(UserWarning, match="generating 4 instead of 10"):
        out = generate(model, ids[:, :60], max_new_tokens=10, eos_token_id=[])
    assert out.shape == (1, 64)
    with pytest.raises(GptkitError, match="max_new_tokens must be below the model's context"):
        generate(model, ids, max_new_tokens=64)


def test_max_length_counts_the_prompt(model):
    ids = torch.tensor([PROMPTS[1]])
    assert generate(model, ids, max_length=12, eos_token_id=[]).shape == (1, 12)
    assert generate(model, ids, eos_token_id=[]).shape == (1, 5 + 20)


# -- argument errors -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature must be a number >= 0"),
    (dict(top_p=0.0, do_sample=True), "top_p must be a number in (0, 1]"),
    (dict(top_p=1.5, do_sample=True), "top_p must be a number in (0, 1]"),
    (dict(top_k=-1, do_sample=True), "top_k must be an integer >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(max_length=3), "max_length counts the prompt"),
    (dict(max_length=30, max_new_tokens=3), "either max_length"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0"),
    (dict(num_return_sequences=0), "num_return_sequences must be an integer >= 1"),
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2, do_sample=True), "does not support do_sample"),
    (dict(num_beams=2, num_return_sequences=3), "must not exceed num_beams"),
    (dict(num_beams=2, early_stopping="soon"), "early_stopping must be True, False or 'never'"),
    (dict(stop=["x"]), "stop strings need a tokenizer"),
    (dict(stop="x", tokenizer=CharTokenizer()), "stop must be a list of non-empty strings"),
    (dict(seed=1, generator=torch.Generator()), "either seed or generator"),
    (dict(eos_token_id=VOCAB), "eos_token_id must be a token id"),
    (dict(eos_token_id=[1, "x"]), "eos_token_id must be a token id"),
    (dict(pad_token_id=-1), "pad_token_id must be a token id"),
    (dict(do_sample="yes"), "do_sample must be True or False"),
    (dict(draft_model="self", do_sample=True), "supports greedy decoding only"),
    (dict(draft_model="self", num_draft_tokens=0), "num_draft_tokens must be an integer >= 1"),
    (dict(draft_model="other_vocab"), "they must share a vocabulary"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 0]])), "pad prompts on the LEFT"),
    (dict(attention_mask=torch.tensor([[1, 1]])), "attention_mask must be a tensor of input_ids'"),
    (dict(attention_mask=torch.tensor([[2, 1, 1, 1, 1]])), "only 0 (pad) and 1"),
])
def test_invalid_arguments_raise_clear_errors(model, kwargs, message):
    if kwargs.get("draft_model") == "self":
        kwargs["draft_model"] = model
    elif kwargs.get("draft_model") == "other_vocab":
        kwargs["draft_model"] = GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=1,
                                              n_head=1, n_embd=8))
    with pytest.raises(GptkitError, match=re.escape(message)):
        generate(model, torch.tensor([PROMPTS[1]]), **kwargs)


@pytest.mark.parametrize("ids,message", [
    ([1, 2], "input_ids must be a non-empty 2-D tensor"),
    (torch.tensor([1, 2]), "input_ids must be a non-empty 2-D tensor"),
    (torch.zeros(1, 0, dtype=torch.long), "input_ids must be a non-empty 2-D tensor"),
    (torch.tensor([[1.0]]), "input_ids must hold integer token ids"),
    (torch.tensor([[VOCAB]]), "expected ids in [0, 257)"),
])
def test_invalid_prompts_raise_clear_errors(model, ids, message):
    with pytest.raises(GptkitError, match=re.escape(message)):
        generate(model, ids)


def test_speculative_needs_a_single_row(model):
    with pytest.raises(GptkitError, match="draft_model supports a batch of one prompt"):
        generate(model, torch.tensor([[1], [2]]), draft_model=model)


def test_sampling_options_without_do_sample_warn(model):
    with pytest.warns(UserWarning, match="only apply with do_sample=True"):
        generate(model, torch.tensor([[1]]), max_new_tokens=2, top_k=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, torch.tensor([[1]]), max_new_tokens=2, temperature=0.0)


# -- speculative decoding -----------------------------------------------------------------

def _count_calls(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_speculative_with_an_identical_draft_accepts_every_guess():
    target, draft = tiny_gpt(seed=3), tiny_gpt(seed=3)
    ids = torch.tensor([PROMPTS[1]])
    greedy = generate(target, ids, max_new_tokens=31, eos_token_id=[])
    calls = _count_calls(target)
    out = generate(target, ids, max_new_tokens=31, eos_token_id=[], draft_model=draft,
                   num_draft_tokens=4)
    assert out.tolist() == greedy.tolist()
    assert calls[0] == 1 + 30 // 5  # prefill, then 5 tokens per verification


@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_with_a_weaker_draft_equals_greedy(k):
    target = tiny_gpt(seed=4, n_layer=3)
    draft = GPT(GPTConfig(**{**target.config.to_dict(), "n_layer": 2})).eval()
    state = {n: p for n, p in target.state_dict().items() if ".h.1." not in n}
    draft.load_state_dict({n.replace(".h.2.", ".h.1."): p for n, p in state.items()})
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        greedy = generate(target, ids, max_new_tokens=30)
        calls = _count_calls(target)
        out = generate(target, ids, max_new_tokens=30, draft_model=draft, num_draft_tokens=k)
        assert out.tolist() == greedy.tolist()
        target._forward_hooks.clear()
        assert calls[0] < out.size(1) - len(prompt)  # some guesses were accepted


# -- the generate command's speed flags ------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("cli") / "model")


def _cli(capsys, model_dir, *flags: str) -> str:
    from gptkit.cli import main

    main(["generate", "To be", "--model", str(model_dir), "--device", "cpu",
          "--max-new-tokens", "12", *flags])
    return capsys.readouterr().out


def test_cli_speed_flags_keep_greedy_text(capsys, model_dir):
    plain = _cli(capsys, model_dir, "--greedy")
    assert plain.startswith("To be") and len(plain) > len("To be\n")
    assert _cli(capsys, model_dir, "--greedy", "--draft-model", str(model_dir)) == plain
    assert _cli(capsys, model_dir, "--greedy", "--dtype", "bfloat16", "--quantize", "int8")


def test_cli_beam_search_prints_each_sequence(capsys, model_dir):
    out = _cli(capsys, model_dir, "--num-beams", "3", "--num-return-sequences", "2")
    assert out.count("-" * 40) == 1 and out.startswith("To be")
