"""`gptkit info`: the facts of a model or run directory, read without loading weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import make_model_dir

from gptkit import GPT, GPTConfig
from gptkit.config import PRESETS
from gptkit.errors import GptkitError
from gptkit.info import count_parameters, directory_info, format_info
from gptkit.tasks import get_task, task_file_writer


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_count_from_config_equals_the_network(preset):
    config = GPTConfig.from_preset(preset, vocab_size=50257)
    with torch.device("meta"):  # shapes only: even gpt2-xl costs nothing
        assert count_parameters(config) == GPT(config).num_params()


def test_model_directory(tmp_path):
    model_dir = make_model_dir(tmp_path / "m", n_embd=48, block_size=40)
    info = directory_info(model_dir)
    model = GPT.from_pretrained(model_dir)
    assert info["kind"] == "model" and info["training"] is None and info["task"] is None
    assert info["config"] == model.config.to_dict()
    assert info["parameters"] == model.num_params()
    assert info["context_length"] == 40
    assert info["tokenizer"] == {"kind": "char", "vocab_size": model.config.vocab_size}
    sizes = {f["name"]: f["bytes"] for f in info["files"]}
    assert sizes["model.safetensors"] == (model_dir / "model.safetensors").stat().st_size
    text = format_info(info)
    assert f"{model.num_params():,}" in text and "char" in text and "model.safetensors" in text


def test_run_directory_with_task_and_metrics(tmp_path):
    run = make_model_dir(tmp_path / "run")
    spec = get_task("summarize")
    task_file_writer(spec)["gptkit_task.json"](run / "gptkit_task.json")
    records = [{"step": 0, "tokens": 0, "val_loss": 4.6},
               {"step": 10, "tokens": 5120, "loss": 3.2, "lr": 1e-3, "tokens_per_s": 900.0},
               {"step": 10, "tokens": 5120, "val_loss": 3.3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    info = directory_info(run)
    assert info["kind"] == "run"
    assert info["task"] == {"task": "summarize", "template": spec.template}
    assert info["training"] == {"steps": 10, "tokens": 5120, "last_val_loss": 3.3,
                                "last_train_loss": 3.2}
    assert "summarize" in format_info(info) and "last val loss 3.3000" in format_info(info)


def test_run_without_a_checkpoint_yet(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    info = directory_info(tmp_path)
    assert info["config"] is None and info["training"]["steps"] == 0
    assert "no model saved yet" in format_info(info)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(GptkitError, match="not a model or run directory"):
        directory_info(tmp_path)


def test_cli_info_json_and_error(tmp_path):
    model_dir = make_model_dir(tmp_path / "m")
    result = subprocess.run([sys.executable, "-m", "gptkit", "info", str(model_dir), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == directory_info(model_dir)
    bad = subprocess.run([sys.executable, "-m", "gptkit", "info", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_demo_folder_describes_the_run_inside_it(tmp_path):
    # `gptkit demo --out runs/demo` keeps its run in runs/demo/model beside corpus/ and data/
    run = make_model_dir(tmp_path / "demo" / "model")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "tokens": 96, "loss": 2.5}) + "\n")
    (tmp_path / "demo" / "corpus").mkdir()
    info = directory_info(tmp_path / "demo")
    assert info["kind"] == "run" and info["training"]["steps"] == 3
    assert info["parameters"] == GPT.from_pretrained(run).num_params()


def test_a_run_stopped_by_its_time_limit_before_logging_reports_its_checkpoint(tmp_path, char_data):
    from gptkit.config import TrainConfig
    from gptkit.train import train

    run = tmp_path / "run"
    result = train(TrainConfig(data=str(char_data), out=str(run), preset="tiny", n_layer=1,
                               n_head=2, n_embd=16, block_size=16, batch_size=2, max_steps=50,
                               max_time=1e-9, eval_interval=0, device="cpu"), progress=False)
    assert result.stopped_early and result.step == 1
    assert directory_info(run)["training"]["steps"] == 1  # metrics.jsonl holds no step yet
    assert directory_info(run)["training"]["tokens"] == result.tokens == 32
