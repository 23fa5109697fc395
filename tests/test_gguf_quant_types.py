"""`gptkit import` of every weight type llama-quantize writes: a llama GGUF file laid out as
llama.cpp's converter lays it out (no key_length, no output head: a tied one), its matrices
stored as Q4_0 ... Q6_K blocks, comes back as float32 tensors equal to the `gguf` package's
own dequantization of those blocks, in Hugging Face's layout, and the model runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit import GPT, Tokenizer

WIDTH, HEADS, KV_HEADS, LAYERS = 256, 4, 2, 1  # rows of 256: the K-quants' block
# Where each type's f16 scales sit in its block (byte offsets); the other bytes are
# quantized values and small integer scales, any value of which is valid.
F16_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def quantized_blocks(qtype, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random valid blocks of `qtype` for a (rows, columns) matrix, as uint8 (rows, bytes)."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)
    for offset in F16_OFFSETS[qtype.name]:
        scales = rng.uniform(0.001, 0.01, len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape[0], -1)


def write_llama(path: Path, tokenizer_dir: Path, qtype, **extra: int) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF file (with `extra` u32 keys under llama.); returns the raw data
    of each quantized tensor."""
    import gguf

    from gptkit.export.gguf_vocab import add_tokenizer, read_tokenizer

    vocab = Tokenizer.from_pretrained(tokenizer_dir).vocab_size
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 64), ("embedding_length", WIDTH),
                       ("block_count", LAYERS), ("feed_forward_length", WIDTH),
                       ("attention.head_count", HEADS), ("attention.head_count_kv", KV_HEADS)):
        writer.add_uint32(f"llama.{key}", value)
    for key, value in extra.items():
        writer.add_uint32(f"llama.{key.replace('__', '.')}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    add_tokenizer(writer, read_tokenizer(tokenizer_dir, vocab, {}))
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.normal(0, 0.5, (vocab, WIDTH)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(WIDTH, np.float32))
    raw = {}
    shapes = {"attn_q": HEADS, "attn_k": KV_HEADS, "attn_v": KV_HEADS, "attn_output": HEADS,
              "ffn_gate": 4, "ffn_up": 4, "ffn_down": 4}
    for layer in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(WIDTH, np.float32))
        for seed, (name, heads) in enumerate(shapes.items()):
            rows = heads * WIDTH // HEADS
            data = quantized_blocks(qtype, (rows, WIDTH), seed)
            raw[f"blk.{layer}.{name}.weight"] = data
            writer.add_tensor(f"blk.{layer}.{name}.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return raw


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    text = "the quick brown fox jumps over the lazy dog. " * 40
    Tokenizer.train(texts=[text], vocab_size=300).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("name", list(F16_OFFSETS))
def test_every_quantized_type_imports_as_its_dequantization(name, tokenizer_dir, tmp_path):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from gptkit.export.gguf_import import import_gguf

    qtype = GGMLQuantizationType[name]
    raw = write_llama(tmp_path / "m.gguf", tokenizer_dir, qtype)
    directory = import_gguf(tmp_path / "m.gguf", tmp_path / "m")
    state = load_file(directory / "model.safetensors")
    assert "lm_head.weight" not in state  # no output head in the file: a tied one
    q = torch.from_numpy(dequantize(raw["blk.0.attn_q.weight"], qtype))
    # llama.cpp's llama rotates adjacent pairs: each head's rows go back to HF's halves
    halves = q.reshape(HEADS, -1, 2, WIDTH).transpose(1, 2).reshape(WIDTH, WIDTH)
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], halves)
    v = torch.from_numpy(dequantize(raw["blk.0.attn_v.weight"], qtype))
    assert torch.equal(state["model.layers.0.self_attn.v_proj.weight"], v)
    down = torch.from_numpy(dequantize(raw["blk.0.ffn_down.weight"], qtype))
    assert torch.equal(state["model.layers.0.mlp.down_proj.weight"], down)
    assert v.abs().max() > 0 and torch.isfinite(v).all()
    model = GPT.from_pretrained(directory)
    assert model.config.head_dim == WIDTH // HEADS and model.config.tie_word_embeddings
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]]))).all()


@pytest.mark.parametrize("extra, message", [
    (dict(expert_count=8), "sets llama.expert_count=8: a mixture of experts, which gptkit does "
                           "not build."),
    (dict(rope__dimension_count=32), "has llama.rope.dimension_count=32 but "
                                     "llama.attention.key_length=64"),
])
def test_keys_gptkit_cannot_honour_are_one_sentence(extra, message, tokenizer_dir, tmp_path):
    from gguf import GGMLQuantizationType

    from gptkit import GptkitError
    from gptkit.export.gguf_import import import_gguf

    write_llama(tmp_path / "m.gguf", tokenizer_dir, GGMLQuantizationType.Q8_0,
                **extra, attention__key_length=WIDTH // HEADS)
    with pytest.raises(GptkitError, match=message.replace(".", r"\.")):
        import_gguf(tmp_path / "m.gguf", tmp_path / "m")
    assert not (tmp_path / "m").exists()
