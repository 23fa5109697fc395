"""The ahead-of-time compiled decode step as a user meets it: `gptkit generate` compiles
it once per model shape and machine (really, with AOTInductor) and later runs load it from
the cache without compiling; its tokens are the eager path's."""

from __future__ import annotations

import os
import subprocess
import sys

from serve_helpers import make_model_dir


def generate(model_dir, cache, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPTKIT_CACHE_DIR": str(cache), "GPTKIT_COMPILE": "1"}
    return subprocess.run([sys.executable, "-m", "gptkit", "generate", "--model", str(model_dir),
                           "--greedy", "--max-new-tokens", "24", *flags, "To be"],
                          capture_output=True, text=True, env=env, check=True)


def test_generate_compiles_the_step_once_then_loads_it(tmp_path):
    # int4: its products run in ATen's int4 kernel, called from the compiled program
    model_dir = make_model_dir(tmp_path / "tiny", block_size=64)
    cache = tmp_path / "cache"
    eager = generate(model_dir, cache, "--quantize", "int4", "--no-compile")
    assert "Compiling" not in eager.stderr and not (cache / "decode").exists()
    first = generate(model_dir, cache, "--quantize", "int4")
    assert "Compiling the decode step" in first.stderr and "done" in first.stderr
    assert [p.suffix for p in (cache / "decode").iterdir()] == [".pt2"]
    second = generate(model_dir, cache, "--quantize", "int4")
    assert "Compiling" not in second.stderr and "warn" not in second.stderr.lower()
    assert first.stdout == second.stdout == eager.stdout
    assert len(eager.stdout) > len("To be") + 20


def test_the_compiled_programs_own_op_runs_without_importing_the_compiler():
    # The tiled LM head's `realize` is called from every compiled fp32 step; a guard that
    # imported torch._dynamo there would stall the first step by about a second.
    code = ("import sys, torch\n"
            "from gptkit.kernels.rowwise import realize\n"
            "x = torch.arange(6.0)\n"
            "y = realize(x)\n"
            "assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
