"""torchrun on CPU with gloo: DDP and FSDP match one process, rank 0 alone writes, resume
across world sizes keeps the loss curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gptkit import GPT

FLAGS = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
         "--block-size", "32", "--batch-size", "4", "--eval-interval", "10", "--eval-steps", "4",
         "--log-interval", "1", "--save-interval", "0", "--device", "cpu", "--warmup-steps", "0",
         "--lr", "2e-3", "--min-lr", "2e-3"]  # a constant rate: runs of any length share a schedule


def run(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", str(29500 + os.getpid() % 1000), "-m", "gptkit"]
                if nproc > 1 else [sys.executable, "-m", "gptkit"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher + [str(a) for a in args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def val_losses(run_dir) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["val_loss"] for x in lines if "val_loss" in x]


@pytest.fixture(scope="module")
def single(char_data, tmp_path_factory):
    """The reference: one process, grad-accum 2, 20 steps."""
    out = tmp_path_factory.mktemp("single") / "run"
    run(["train", "--data", char_data, "--out", out, "--max-steps", "20", "--grad-accum", "2", *FLAGS])
    return out


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_match_one_with_accumulation(char_data, single, tmp_path, sharding):
    out = tmp_path / "run"
    result = run(["train", "--data", char_data, "--out", out, "--max-steps", "20", *FLAGS,
                  *sharding], nproc=2)
    assert "global batch 8" in result.stderr
    assert losses(out) == pytest.approx(losses(single), abs=1e-5)
    assert val_losses(out) == pytest.approx(val_losses(single), abs=1e-5)
    # rank 0 alone wrote: one metrics file, one checkpoint, no stray per-rank files
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["config.json", "generation_config.json", "gptkit_manifest.json", "loss.png",
                     "metrics.jsonl", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                     "train_config.json", "train_state.pt"]
    # the gathered checkpoint is an ordinary model directory with the same weights
    a, b = GPT.from_pretrained(out), GPT.from_pretrained(single)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-4), name


def test_muon_under_ddp_matches_one_process(char_data, tmp_path):
    """Each rank runs Muon on the all-reduced gradients: the same update as one process."""
    common = ["train", "--data", char_data, "--max-steps", "8", *FLAGS, "--optimizer", "muon",
              "--muon-lr", "0.02"]
    run([*common, "--out", tmp_path / "one", "--grad-accum", "2"])
    run([*common, "--out", tmp_path / "two"], nproc=2)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    assert val_losses(tmp_path / "two") == pytest.approx(val_losses(tmp_path / "one"), abs=1e-4)


def test_resume_two_process_checkpoint_in_one_process(char_data, single, tmp_path):
    out = tmp_path / "run"
    run(["train", "--data", char_data, "--out", out, "--max-steps", "10", *FLAGS], nproc=2)
    result = run(["train", "--data", char_data, "--out", out, "--max-steps", "20", "--resume", *FLAGS])
    assert "grad-accum set to 2" in result.stderr
    assert losses(out) == pytest.approx(losses(single), abs=1e-5)


def test_finetune_under_torchrun_matches_one_process(tmp_path):
    from tiny_models import make_model_dir, write_jsonl

    base = make_model_dir(tmp_path / "base")
    records = [{"prompt": f"copy {w}:", "completion": f" {w}"}
               for w in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")]
    data = write_jsonl(tmp_path / "train.jsonl", records * 4)
    common = ["finetune", "--model", base, "--task", "completion", "--data", data,
              "--max-steps", "6", "--batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-3",
              "--warmup-steps", "0", "--log-interval", "1", "--eval-interval", "0",
              "--save-interval", "0", "--device", "cpu"]
    run([*common, "--out", tmp_path / "two"], nproc=2)
    run([*common, "--out", tmp_path / "one", "--grad-accum", "2"])
    assert len(losses(tmp_path / "one")) == 6
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
