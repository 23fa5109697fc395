"""The training loop: losses fall, runs resume bit for bit, signals save, bad settings explain."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from resume_helpers import straight_and_resumed

from gptkit import GPT, GptkitError
from gptkit.config import TrainConfig
from gptkit.optim import lr_at
from gptkit.train import train

TINY = dict(preset="tiny", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8,
            eval_steps=2, log_interval=1, device="cpu", warmup_steps=5, lr=3e-3, min_lr=3e-4)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_run_directory_is_a_model_directory(char_data, tmp_path):
    cfg = TrainConfig(data=str(char_data), out=str(tmp_path / "run"), max_steps=60,
                      eval_interval=30, **TINY)
    result = train(cfg, progress=False)
    lines = metrics(tmp_path / "run")
    train_lines = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "val_loss" in m]
    assert {"step", "tokens", "loss", "lr", "tokens_per_s"} <= set(train_lines[0])
    assert [m["step"] for m in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.7  # from ~ln(65) toward bigrams
    assert result.tokens == 60 * 8 * 32
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt",
            "metrics.jsonl", "train_config.json"} <= files
    model = GPT.from_pretrained(tmp_path / "run")
    text = (char_data.parent / "input.txt").read_text()
    assert model.config.n_layer == 2
    assert model.config.vocab_size == len(set(text)) + 2  # the characters, end-of-text, unknown


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(char_data, tmp_path, optimizer):
    """20 steps straight == stopping after every step and resuming: same losses and weights."""
    straight, resumed = straight_and_resumed(tmp_path, 20, data=str(char_data), eval_interval=0,
                                             dropout=0.1, optimizer=optimizer, **TINY)
    assert [m["loss"] for m in straight] == [m["loss"] for m in resumed]
    a, b = GPT.from_pretrained(tmp_path / "straight"), GPT.from_pretrained(tmp_path / "resumed")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_sigterm_saves_a_checkpoint_and_resume_finishes(char_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptkit", "train", "--data", str(char_data), "--out", str(run),
           "--preset", "tiny", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
           "--block-size", "32", "--batch-size", "4", "--max-steps", "100000",
           "--eval-interval", "0", "--save-interval", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "saved checkpoint" in out + err
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert 0 < state["step"] < 100000
    finish = subprocess.run(cmd[:-8] + ["--max-steps", str(state["step"] + 3), "--eval-interval", "0",
                                        "--device", "cpu", "--resume", "--block-size", "32"],
                            capture_output=True, text=True, timeout=120)
    assert finish.returncode == 0, finish.stderr
    assert torch.load(run / "train_state.pt", weights_only=True)["step"] == state["step"] + 3


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11)
    assert lr_at(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_init_from_continues_from_weights(char_data, tmp_path):
    first = TrainConfig(data=str(char_data), out=str(tmp_path / "a"), max_steps=30, eval_interval=30, **TINY)
    train(first, progress=False)
    second = TrainConfig(data=str(char_data), out=str(tmp_path / "b"), max_steps=1, eval_interval=1,
                         init_from=str(tmp_path / "a"), **{k: v for k, v in TINY.items()
                                                            if k not in ("n_layer", "n_head", "n_embd")})
    train(second, progress=False)
    val_a = [m for m in metrics(tmp_path / "a") if "val_loss" in m][-1]["val_loss"]
    val_b0 = [m for m in metrics(tmp_path / "b") if "val_loss" in m][0]["val_loss"]
    assert val_b0 == pytest.approx(val_a, abs=1e-6)


@pytest.mark.parametrize("settings, message", [
    (dict(resume=True), "holds no checkpoint"),
    (dict(batch_size=0), "--batch-size is 0"),
    (dict(lr=1e-4, min_lr=1e-3), "min-lr"),
    (dict(preset="smal"), "did you mean 'small'"),
])
def test_bad_settings(char_data, tmp_path, settings, message):
    with pytest.raises(GptkitError, match=message):
        train(TrainConfig(data=str(char_data), out=str(tmp_path / "run"), **{**TINY, **settings}),
              progress=False)


def test_block_size_beyond_init_model_context(char_data, tmp_path):
    train(TrainConfig(data=str(char_data), out=str(tmp_path / "a"), max_steps=1, eval_interval=0, **TINY),
          progress=False)
    with pytest.raises(GptkitError, match="larger than the context"):
        train(TrainConfig(data=str(char_data), out=str(tmp_path / "b"), init_from=str(tmp_path / "a"),
                          **{**{k: v for k, v in TINY.items() if k not in ("n_layer", "n_head", "n_embd")},
                             "block_size": 64}), progress=False)


def test_unknown_config_file_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("batch_size = 4\nlearning_rate = 0.1\n")
    with pytest.raises(GptkitError, match="Unknown key 'learning_rate'"):
        TrainConfig.from_file(path)
    path.write_text("batch_size = 4\nmax_steps = 7\n")
    cfg = TrainConfig.from_file(path, max_steps=9)
    assert (cfg.batch_size, cfg.max_steps) == (4, 9)


def test_existing_run_needs_resume(char_data, tmp_path):
    cfg = dict(data=str(char_data), out=str(tmp_path / "run"), max_steps=1, eval_interval=0, **TINY)
    train(TrainConfig(**cfg), progress=False)
    with pytest.raises(GptkitError, match="pass --resume"):
        train(TrainConfig(**cfg), progress=False)



def test_activation_checkpointing_gives_the_same_gradients():
    from gptkit import GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16)).train()
    x = torch.randint(0, 50, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(x, targets=x).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    import gptkit.train as train_module

    class Broken:
        def __call__(self, *args, **kwargs):
            from torch._dynamo.exc import BackendCompilerFailed

            raise BackendCompilerFailed.__new__(BackendCompilerFailed)

    monkeypatch.setattr(torch, "compile", lambda model: Broken())
    model = torch.nn.Linear(3, 2)
    wrapped = train_module.CompileFallback(model)
    x = torch.ones(1, 3)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        assert torch.equal(wrapped(x), model(x))
    assert wrapped.compiled is None
