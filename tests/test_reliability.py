"""Crash safety: SIGKILL anywhere, non-finite losses, a full disk, hostile files."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptkit import GPT, GPTConfig, GptkitError
from gptkit.checkpoint import _fingerprint, recover
from gptkit.config import TrainConfig
from gptkit.runlog import read_metrics
from gptkit.train import load_train_state, train

TINY = dict(preset="tiny", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4,
            eval_interval=0, log_interval=1, device="cpu", warmup_steps=2, lr=3e-3, min_lr=3e-4)


# -- SIGKILL at random moments ------------------------------------------------------------

def train_cmd(data: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "gptkit", "train", "--data", str(data), "--out", str(out),
            "--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
            "--block-size", "32", "--batch-size", "4", "--max-steps", "150", "--save-interval", "1",
            "--eval-interval", "0", "--device", "cpu", "--dropout", "0.1"] + (["--resume"] if resume else [])


def assert_readable(run: Path) -> int:
    """The checkpoint in `run` loads completely; returns its step."""
    model = GPT.from_pretrained(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return int(load_train_state(run)["step"])


def test_sigkill_anywhere_then_resume_gives_bitwise_equal_weights(char_data, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(train_cmd(char_data, reference, False), check=True, capture_output=True, timeout=300)
    run = tmp_path / "killed"
    rng = random.Random(0)
    kills, during_commit, steps_seen = 0, 0, []
    while True:
        started = (run / "train_state.pt").exists()
        proc = subprocess.Popen(train_cmd(char_data, run, started), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        if kills >= 6:  # enough trials: let the last one finish
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()[-2000:]
            break
        deadline = time.time() + 60
        if kills % 2:  # aim at a checkpoint write: kill as soon as a commit is staged
            while not (run / ".staging").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.0005)
            during_commit += (run / ".staging").exists()
        else:  # anywhere in the steps: once training runs, after a random moment
            logged = len(read_metrics(run / "metrics.jsonl"))
            while (len(read_metrics(run / "metrics.jsonl")) <= logged and proc.poll() is None
                   and time.time() < deadline):
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:  # the run finished before the kill
            assert proc.returncode == 0
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        recover(run)  # what any loader does first: finish or discard an interrupted commit
        if (run / "train_state.pt").exists():
            steps_seen.append(assert_readable(run))
    assert kills >= 6, f"only {kills} kills landed"
    assert during_commit >= 1
    assert steps_seen == sorted(steps_seen)  # progress is never lost
    a, b = GPT.from_pretrained(reference), GPT.from_pretrained(run)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    ref_losses = [m["loss"] for m in read_metrics(reference / "metrics.jsonl") if "loss" in m]
    run_losses = [m["loss"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert run_losses == ref_losses


def test_damaged_checkpoint_falls_back_to_the_previous_one(char_data, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(data=str(char_data), out=str(run), max_steps=10, save_interval=5, **TINY),
          progress=False)
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit: same size, different hash
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged.*fell back to the previous checkpoint"):
        assert load_train_state(run)["step"] == 5
    assert assert_readable(run) == 5


def test_damaged_checkpoint_without_previous_is_an_error(char_data, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(data=str(char_data), out=str(run), max_steps=3, **TINY), progress=False)
    (run / "train_state.pt").write_bytes(b"truncated")
    with pytest.raises(GptkitError, match="train_state.pt is damaged"):
        load_train_state(run)


# -- non-finite losses --------------------------------------------------------------------

def nan_on(calls: set[int], monkeypatch) -> None:
    """Make the training loss NaN on the given (0-based) training calls."""
    import gptkit.kernels as kernels

    real = kernels.linear_cross_entropy
    counter = {"n": 0}

    def patched(hidden, weight, targets, *rest):
        loss = real(hidden, weight, targets, *rest)
        if torch.is_grad_enabled():
            counter["n"] += 1
            if counter["n"] - 1 in calls:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(kernels, "linear_cross_entropy", patched)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # skipped on the device, or on the host
def test_non_finite_step_is_skipped_and_logged(char_data, tmp_path, monkeypatch, optimizer):
    nan_on({3, 4}, monkeypatch)
    train(TrainConfig(data=str(char_data), out=str(tmp_path / "run"), max_steps=10,
                      optimizer=optimizer, **TINY), progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "non_finite_step_skipped"] == [4, 5]
    model = GPT.from_pretrained(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = load_train_state(tmp_path / "run")
    assert state["step"] == 10


def test_consecutive_non_finite_steps_stop_training(char_data, tmp_path, monkeypatch):
    nan_on(set(range(6, 100)), monkeypatch)
    with pytest.raises(GptkitError, match="3 consecutive steps had a NaN"):
        train(TrainConfig(data=str(char_data), out=str(tmp_path / "run"), max_steps=50,
                          save_interval=5, max_bad_steps=3, **TINY), progress=False)
    assert load_train_state(tmp_path / "run")["step"] == 5  # the last good checkpoint is kept


def test_loss_spike_is_logged(char_data, tmp_path, monkeypatch):
    import gptkit.kernels as kernels

    real = kernels.linear_cross_entropy
    counter = {"n": 0}

    def spiky(hidden, weight, targets, *rest):
        counter["n"] += torch.is_grad_enabled()
        return real(hidden, weight, targets, *rest) * (10.0 if counter["n"] == 8 else 1.0)

    monkeypatch.setattr(kernels, "linear_cross_entropy", spiky)
    train(TrainConfig(data=str(char_data), out=str(tmp_path / "run"), max_steps=10, **TINY),
          progress=False)
    spikes = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "loss_spike"]
    assert [s["step"] for s in spikes] == [8]


# -- a full disk ---------------------------------------------------------------------------

def test_disk_full_keeps_last_good_checkpoint(char_data, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def fills_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    with pytest.raises(GptkitError, match="Could not write a checkpoint .*No space left on device.*intact"):
        train(TrainConfig(data=str(char_data), out=str(tmp_path / "run"), max_steps=20,
                          save_interval=5, **TINY), progress=False)
    run = tmp_path / "run"
    assert not (run / ".staging").exists()  # the failed write's space is freed
    assert assert_readable(run) == 5
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    train(TrainConfig(data=str(char_data), out=str(run), max_steps=20, save_interval=5, resume=True,
                      **TINY), progress=False)
    assert assert_readable(run) == 20


# -- hostile files -------------------------------------------------------------------------

class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_is_refused_without_running(char_data, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(data=str(char_data), out=str(run), max_steps=2, **TINY), progress=False)
    marker = tmp_path / "pwned"
    (run / "train_state.pt").write_bytes(pickle.dumps({"step": Payload(marker)}))
    # the attacker also controls the manifest, so only the unpickler stands in the way
    manifest = json.loads((run / "gptkit_manifest.json").read_text())
    manifest["train_state.pt"] = _fingerprint(run / "train_state.pt")
    (run / "gptkit_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GptkitError, match="not a loadable training state"):
        train(TrainConfig(data=str(char_data), out=str(run), max_steps=4, resume=True, **TINY),
              progress=False)
    assert not marker.exists()


def test_torch_pickle_of_weights_is_never_read(tmp_path):
    """A directory with only pytorch_model.bin (pickle) is refused, not unpickled."""
    torch.manual_seed(0)
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(GptkitError, match="safetensors only"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(n_layer="twelve"), "n_layer"),
    (lambda c: c.update(n_embd=10**7), "n_embd"),
    (lambda c: c.update(model_type="mamba"), "model_type 'mamba'"),
    (lambda c: c.pop("n_head"), "lacks"),
])
def test_bad_config_json(tmp_path, edit, message):
    GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GptkitError, match=message):
        GPT.from_pretrained(tmp_path)


def test_config_json_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GptkitError, match="not valid JSON"):
        GPT.from_pretrained(tmp_path)


def test_tensorboard_event_file_holds_the_scalars(char_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(TrainConfig(data=str(char_data), out=str(run), max_steps=6, tensorboard=True,
                      **{**TINY, "eval_interval": 3}), progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    metrics = [m["loss"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert losses == pytest.approx(metrics, rel=1e-6)
    assert [e.step for e in events.Scalars("val/loss")] == [0, 3, 6]
