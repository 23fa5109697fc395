"""LoRA: only adapters train, merging is exact, and peft reads our adapters with the same logits."""

from __future__ import annotations

import pytest
import torch

from gptkit import GPT, GPTConfig, GptkitError
from gptkit.checkpoint import save_model
from gptkit.lora import (
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merged_model,
    save_peft_adapter,
    trainable_parameters,
)

CONFIG = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def lora_model(rank: int = 4, seed: int = 0) -> tuple[GPT, GPT]:
    """(the base model, a copy with LoRA whose B is random so the adapters matter)."""
    torch.manual_seed(seed)
    base = GPT(GPTConfig(**CONFIG)).eval()
    model = GPT(GPTConfig(**CONFIG)).eval()
    model.load_state_dict(base.state_dict())
    apply_lora(model, rank, alpha=2.0 * rank)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    return base, model


def test_only_adapters_train_and_their_count_is_rank_times_widths():
    model = apply_lora(GPT(GPTConfig(**CONFIG)), rank=4)
    # per block, r * (in + out): c_attn 32+96, attn c_proj 32+32, c_fc 32+128, mlp c_proj 128+32
    assert trainable_parameters(model) == 2 * 4 * (128 + 64 + 160 + 160)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(lora_layers(model)) == 2 * 4


def test_fresh_adapters_leave_the_model_unchanged():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG)).eval()
    x = torch.randint(0, 50, (2, 10))
    before = model(x)
    apply_lora(model, rank=8)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_merged_and_unmerged_agree_and_unmerge_restores_the_base():
    base, model = lora_model()
    x = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - base(x)).abs().max() > 1e-2  # the adapters do change the output
        copy = merged_model(model)
        assert not lora_layers(copy) and lora_layers(model)
        assert (copy(x) - unmerged).abs().max() < 1e-5
        for layer in lora_layers(model).values():
            layer.merge()
        assert (model(x) - unmerged).abs().max() < 1e-5
        for layer in lora_layers(model).values():
            layer.unmerge()
        assert (model(x) - unmerged).abs().max() < 1e-5
    for name, tensor in base.state_dict().items():
        key = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        restored = model.state_dict().get(key, model.state_dict().get(name))
        torch.testing.assert_close(restored, tensor, atol=1e-6, rtol=0)


def test_peft_loads_our_adapter_onto_the_transformers_model_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, model = lora_model()
    save_model(base, tmp_path / "base")
    save_peft_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        ours, theirs = model(x), with_adapter(x).logits
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - base(x)).abs().max() > 1e-2


def test_adapter_state_round_trips_and_mismatches_explain():
    _, model = lora_model(rank=4, seed=1)
    state = lora_state_dict(model)
    _, other = lora_model(rank=4, seed=1)
    for layer in lora_layers(other).values():
        torch.nn.init.normal_(layer.lora_B, std=0.2)  # same base, other adapters
    x = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(other(x), model(x))
        load_lora_state_dict(other, state, "saved")
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    _, wider = lora_model(rank=8)
    with pytest.raises(GptkitError, match="has shape .*--lora-rank"):
        load_lora_state_dict(wider, state, "saved")


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_rank_below_one_is_refused(rank):
    with pytest.raises(GptkitError, match="--lora-rank"):
        apply_lora(GPT(GPTConfig(**CONFIG)), rank=rank)


def test_dropout_applies_to_the_adapter_path_only_in_training():
    layer = LoRALinear(torch.nn.Linear(8, 8), rank=2, alpha=4.0, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
