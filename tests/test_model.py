"""The network and its checkpoint format, with Hugging Face `transformers` as the oracle."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import gptkit.kernels.ops
from gptkit import GPT, GPTConfig, GptkitError
from gptkit.checkpoint import commit_files, recover
from gptkit.kernels.ops import causal_attention, gelu_tanh

TINY = dict(vocab_size=101, block_size=32, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, eos_token_id=100)).eval()


def test_saved_model_opens_in_transformers_with_same_logits(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4)


def test_transformers_gpt2_loads_with_same_logits(tmp_path):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=40, n_embd=24, n_layer=3,
                                    n_head=4)).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config.block_size == 40 and ours.config.n_head == 4
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)


def test_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = GPT.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert again.lm_head.weight is again.transformer.wte.weight


def test_kv_cache_matches_full_forward(model):
    ids = torch.randint(0, 101, (2, 12))
    full = model(ids)
    model.setup_cache(2, 32)
    causal = torch.ones(32, 32, dtype=torch.bool).tril()
    with torch.no_grad():
        prefill = model(ids[:, :8], input_pos=torch.arange(8), attn_mask=causal[:8].view(1, 1, 8, 32))
        steps = [model(ids[:, t:t + 1], input_pos=torch.tensor([t]),
                       attn_mask=causal[t].view(1, 1, 1, 32)) for t in range(8, 12)]
    model.clear_cache()
    cached = torch.cat([prefill] + steps, dim=1)
    assert torch.allclose(cached, full, atol=1e-5)


def test_per_row_cache_positions(model):
    """Rows at different positions (continuous batching) write their own slots."""
    a, b = torch.randint(0, 101, (1, 6)), torch.randint(0, 101, (1, 6))
    model.setup_cache(2, 32)
    causal = torch.ones(32, 32, dtype=torch.bool).tril()
    with torch.no_grad():
        # row 0 consumes 6 tokens, row 1 only 4; then each takes one step at its own position
        model(torch.cat([a, b]), input_pos=torch.arange(6), attn_mask=causal[:6].view(1, 1, 6, 32))
        pos = torch.tensor([[6], [4]])
        mask = causal[pos.view(-1)].view(2, 1, 1, 32)
        nxt = torch.tensor([[7], [9]])
        step = model(nxt, input_pos=pos, position_ids=pos, attn_mask=mask)
    model.clear_cache()
    ref0 = model(torch.cat([a, nxt[:1]], 1))[:, -1]
    ref1 = model(torch.cat([b[:, :4], nxt[1:]], 1))[:, -1]
    assert torch.allclose(step[0, -1], ref0[0], atol=1e-5)
    assert torch.allclose(step[1, -1], ref1[0], atol=1e-5)


def test_parameter_count_and_presets():
    gpt2 = GPTConfig.from_preset("gpt2")
    with torch.device("meta"):
        n = GPT(gpt2).num_params()
    assert n == 124_439_808  # the published GPT-2 small count with tied embeddings
    assert GPTConfig.from_preset("gpt2-xl").n_embd == 1600
    assert GPTConfig.from_preset("tiny", vocab_size=65).vocab_size == 65


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=8, n_head=4, n_embd=256))
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 1e-3
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 1e-3


@pytest.mark.parametrize("values, message", [
    (dict(n_embd=30, n_head=4), "not divisible"),
    (dict(n_layer=10**9), "n_layer"),
    (dict(dropout=1.5), "dropout"),
    (dict(vocab_size="big"), "vocab_size"),
])
def test_bad_config_values(values, message):
    with pytest.raises(GptkitError, match=message):
        GPTConfig(**{**TINY, **values})


def test_unknown_config_key_suggests_closest():
    with pytest.raises(GptkitError, match="did you mean 'n_layer'"):
        GPTConfig.from_dict({"n_layers": 2})
    with pytest.raises(GptkitError, match="did you mean 'small'"):
        GPTConfig.from_preset("smal")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(GptkitError, match="not a model directory"):
        GPT.from_pretrained(tmp_path)


def test_hub_name_offline_gives_one_sentence(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(GptkitError, match="Could not find 'gpt2'.*local model directory"):
        GPT.from_pretrained("gpt2")


def test_truncated_weights_are_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(GptkitError, match="model.safetensors is damaged"):
        GPT.from_pretrained(tmp_path)  # caught by the manifest's size
    (tmp_path / "gptkit_manifest.json").unlink()  # as in a directory copied without it
    with pytest.raises(GptkitError, match="corrupted or truncated"):
        GPT.from_pretrained(tmp_path)


def test_weights_that_disagree_with_config_are_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"], config["n_head"] = 32, 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GptkitError, match="has shape"):
        GPT.from_pretrained(tmp_path)


def test_absurd_config_is_refused_before_allocating(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_layer"] = 10**9
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GptkitError, match="n_layer"):
        GPT.from_pretrained(tmp_path)


def test_interrupted_commit_keeps_previous_files(tmp_path):
    commit_files(tmp_path, {"a.txt": lambda p: p.write_text("old a"),
                            "b.txt": lambda p: p.write_text("old b")})

    def crash(path):
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        commit_files(tmp_path, {"a.txt": lambda p: p.write_text("new a"), "b.txt": crash})
    recover(tmp_path)
    assert (tmp_path / "a.txt").read_text() == "old a"
    assert (tmp_path / "b.txt").read_text() == "old b"
    assert not (tmp_path / ".staging").exists()


def test_a_kill_while_marking_the_commit_discards_it(tmp_path):
    """The marker is written under another name and renamed whole, so a kill mid-write
    leaves only that partial file (recovery once read an empty marker and crashed)."""
    commit_files(tmp_path, {"a.txt": lambda p: p.write_text("old a")})
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "a.txt").write_text("new a")
    (staging / "COMPLETE.tmp").write_text("")  # killed before the rename
    recover(tmp_path)
    assert (tmp_path / "a.txt").read_text() == "old a"
    assert not staging.exists()


def test_complete_staging_is_rolled_forward(tmp_path):
    """A kill after the commit was marked complete but before every rename finishes."""
    commit_files(tmp_path, {"a.txt": lambda p: p.write_text("old a"),
                            "b.txt": lambda p: p.write_text("old b")})
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "b.txt").write_text("new b")  # a.txt already moved into place
    (tmp_path / "a.txt").write_text("new a")
    (staging / "COMPLETE").write_text(json.dumps(["a.txt", "b.txt"]))
    recover(tmp_path)
    assert (tmp_path / "b.txt").read_text() == "new b"


def test_tensor_shapes_match_the_network():
    config = GPTConfig(**TINY)
    real = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}
    assert config.tensor_shapes() == real


def test_written_out_causal_attention_is_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    ours = causal_attention(q, k, v)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(ours, sdpa, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(sdpa.square().sum(), (q, k, v)), strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_compiled_cpu_training_traces_the_written_out_attention(monkeypatch):
    # aot_eager: the tracing inductor does, without its C++ build; the loss and every
    # gradient must equal the eager (SDPA) model's.
    torch.manual_seed(0)
    eager = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16))
    compiled_model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16))
    compiled_model.load_state_dict(eager.state_dict())
    traced = []

    def spy(q, k, v, scale=None):
        traced.append(q.shape)
        return causal_attention(q, k, v, scale)

    monkeypatch.setattr(gptkit.kernels.ops, "causal_attention", spy)
    x = torch.randint(0, 40, (3, 16))
    losses = []
    for model in (eager, torch.compile(compiled_model, backend="aot_eager", fullgraph=True)):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        losses.append(loss)
    assert traced and all(shape == (3, 2, 16, 8) for shape in traced)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_compiled_gelu_form_equals_the_tanh_gelu():
    traced = []

    def recording_backend(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module

    x = torch.linspace(-12, 12, 2001, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(gelu_tanh, backend=recording_backend, fullgraph=True)
    reference = torch.nn.functional.gelu(x, approximate="tanh")
    assert torch.allclose(compiled(x), reference, atol=1e-12)
    assert any("sigmoid" in op for op in traced) and not any("gelu" in op for op in traced)
    ours, = torch.autograd.grad(compiled(x).sum(), x)
    theirs, = torch.autograd.grad(reference.sum(), x)
    assert torch.allclose(ours, theirs, atol=1e-12)
    assert torch.equal(gelu_tanh(x), reference)  # eager keeps ATen's kernel
