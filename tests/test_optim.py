"""Optimizers: which parameters Muon takes, its batched Newton-Schulz step against torch's,
the schedule of both groups, Muon training and fine-tuning, and the refusals."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import make_model_dir, write_jsonl

from gptkit import GPT, GPTConfig, GptkitError
from gptkit.config import TrainConfig
from gptkit.optim import (
    Muon,
    apply_schedule,
    lr_at,
    make_optimizer,
    orthogonalize,
    split_parameters,
)
from gptkit.train import train

TINY = dict(preset="tiny", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8,
            eval_steps=2, log_interval=1, device="cpu", warmup_steps=5, lr=3e-3, min_lr=3e-4)
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_gpt()
    muon, adamw = split_parameters(model)
    assert [n for n, _ in muon] == [f"transformer.h.{i}.{m}.weight" for i in range(2)
                                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    names = [n for n, _ in adamw]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]  # the tied head too
    assert all(n.endswith(".bias") or ".ln_" in n for n in names[2:])
    assert {n for n, _ in muon} | set(names) == {n for n, _ in model.named_parameters()}

    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05), CPU)
    assert opt.parts == [opt.muon, opt.adamw] and isinstance(opt.muon, Muon)
    assert [len(g["params"]) for g in opt.muon.param_groups] == [8]
    assert [len(g["params"]) for g in opt.adamw.param_groups] == [2, len(names) - 2]
    assert [g["weight_decay"] for g in opt.adamw.param_groups] == [0.1, 0.0]
    assert make_optimizer(model, TrainConfig(), CPU).muon is None  # adamw: one optimizer for all


def test_lora_adapters_are_muons_and_frozen_weights_nobodys():
    from gptkit.lora import apply_lora

    model = tiny_gpt()
    apply_lora(model, rank=4, alpha=8)
    muon, adamw = split_parameters(model)
    assert muon and all(n.endswith(("lora_A", "lora_B")) for n, _ in muon)
    assert adamw == []


def test_schedule_gives_each_group_its_own_peak():
    cfg = TrainConfig(optimizer="muon", lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110,
                      muon_lr=0.02, muon_momentum=0.9)
    opt = make_optimizer(tiny_gpt(), cfg, CPU)
    for step in (0, 10, 60, 110):
        assert apply_schedule(opt, step, cfg) == lr_at(step, cfg)
        assert all(g["lr"] == lr_at(step, cfg) for g in opt.adamw.param_groups)
        assert opt.muon.param_groups[0]["lr"] == pytest.approx(20 * lr_at(step, cfg))
        assert opt.muon.param_groups[0]["momentum"] == 0.9


def test_batched_newton_schulz_is_the_per_matrix_iteration():
    torch.manual_seed(0)
    x = torch.randn(3, 48, 16)
    coefficients = (3.4445, -4.775, 2.0315)
    batched = orthogonalize(x, 5, coefficients, 1e-7)
    for one, matrix in zip(batched, x, strict=True):  # torch's recipe, in float32
        y = matrix.T / matrix.norm()
        for _ in range(5):
            gram = y @ y.T
            y = coefficients[0] * y + (coefficients[1] * gram + coefficients[2] * gram @ gram) @ y
        assert torch.allclose(one, y.T, atol=1e-5)
        singular = torch.linalg.svdvals(one)
        assert 0.5 < singular.min() and singular.max() < 1.5  # near-orthogonal, as Muon wants


def test_muon_step_is_torchs_muon_step():
    """Momentum, Nesterov, weight decay and the shape-adjusted lr as torch's Muon (bfloat16 there)."""
    torch.manual_seed(0)
    shapes = [(64, 16), (64, 16), (16, 64), (32, 32)]
    start = [torch.randn(s) for s in shapes]
    results = []
    for cls in (Muon, torch.optim.Muon):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = cls(params, lr=0.02, momentum=0.9, weight_decay=0.1)
        torch.manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        results.append([p.detach() - s for p, s in zip(params, start, strict=True)])
    for ours, theirs in zip(*results, strict=True):
        assert (ours - theirs).norm() < 0.02 * theirs.norm()


def test_loss_falls_with_muon(char_data, tmp_path):
    cfg = TrainConfig(data=str(char_data), out=str(tmp_path / "run"), max_steps=60, eval_interval=30,
                      optimizer="muon", muon_lr=0.02, **TINY)
    train(cfg, progress=False)
    evals = [m["val_loss"] for m in metrics(tmp_path / "run") if "val_loss" in m]
    assert evals[-1] < evals[0] - 0.7
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert json.loads(state["config"])["optimizer"] == "muon"
    assert any("momentum_buffer" in s for s in state["optimizer"]["state"].values())


@pytest.mark.parametrize("first, then", [("muon", "adamw"), ("adamw", "muon")])
def test_resuming_with_the_other_optimizer_is_refused(char_data, tmp_path, first, then):
    run = tmp_path / "run"
    settings = dict(data=str(char_data), out=str(run), eval_interval=0, **TINY)
    train(TrainConfig(max_steps=2, optimizer=first, **settings), progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(GptkitError, match=f"was trained with --optimizer {first}; resume it with "
                                          f"--optimizer {first}"):
        train(TrainConfig(max_steps=4, optimizer=then, resume=True, **settings), progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("settings, message", [
    (dict(optimizer="adam"), r"--optimizer 'adam' is unknown \(did you mean 'adamw'\?\); "
                             r"expected one of adamw, muon\."),
    (dict(optimizer="muon", fsdp=True), r"--optimizer muon does not work with --fsdp"),
    (dict(muon_lr=0.0), r"--muon-lr is 0.0; expected a positive number"),
    (dict(muon_momentum=1.0), r"--muon-momentum is 1.0; expected a number in \[0, 1\)"),
])
def test_bad_optimizer_settings(settings, message):
    with pytest.raises(GptkitError, match=message):
        TrainConfig(**settings)


@pytest.mark.parametrize("lora_rank, ratio", [(None, 0.7), (4, 0.9)], ids=["full", "lora"])
def test_finetune_with_muon(tmp_path, lora_rank, ratio):
    """30 steps on a reversal task from random weights: AdamW reaches 0.56 (full) and 0.87 (LoRA)
    of the first loss, Muon 0.55 and 0.84."""
    from gptkit.finetune import finetune, train_settings

    base = make_model_dir(tmp_path / "base", block_size=16, chars="abcdefgh=")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcd") for _ in range(4)) for _ in range(200)]
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": w + "=", "completion": w[::-1]} for w in words])
    result = finetune(train_settings(
        init_from=str(base), data=str(data), out=str(tmp_path / "run"), task="completion",
        lora_rank=lora_rank, optimizer="muon", max_steps=30, batch_size=16, lr=3e-3, muon_lr=0.02,
        warmup_steps=3, eval_interval=0, save_interval=0, log_interval=1, device="cpu"), progress=False)
    assert result.losses[-1] < ratio * result.losses[0]
