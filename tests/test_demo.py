"""`gptkit demo` end to end, on a short time budget: offline, learns, leaves a model that
gptkit and transformers both open."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from gptkit import GPT, Tokenizer


def test_demo_learns_and_leaves_a_model_directory(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "gptkit", "demo", "--out", str(out),
                             "--minutes", "0.1", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # offline by design
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = map(float, re.search(r"val loss: ([\d.]+) before training, ([\d.]+) after",
                                         result.stdout).groups())
    # 6 s of training: a busy machine (CI's other test worker) may take only a few steps,
    # yet the loss still falls well below the uniform guess's ln(4096) = 8.318
    assert after < before - 0.5
    assert result.stdout.count("\n--- ") == 3  # three samples
    model_dir = out / "model"
    ids = Tokenizer.from_pretrained(model_dir).encode("The return statement", return_tensors="pt")
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, GPT.from_pretrained(model_dir)(ids), atol=1e-4)
