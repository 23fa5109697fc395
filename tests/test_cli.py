"""The `gptkit` command end to end, as a user types it, and its one-sentence errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptkit import GPT, Tokenizer

TRAIN_FLAGS = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
               "--block-size", "32", "--batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
               "--warmup-steps", "5", "--eval-steps", "2", "--device", "cpu"]


def gptkit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "gptkit", *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"gptkit {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, repo_data) -> Path:
    """tokenizer train -> prepare -> train, through the command line."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    text = (repo_data / "prose" / "moby_dick.txt").read_text()[30_000:150_000]
    for i in range(6):
        (corpus / f"part{i}.txt").write_text(text[i * 20_000:(i + 1) * 20_000])
    gptkit("tokenizer", "train", corpus, "--vocab-size", "512", "--out", root / "tok")
    gptkit("prepare", corpus, "--tokenizer", root / "tok", "--out", root / "data")
    gptkit("train", "--data", root / "data", "--out", root / "run", "--max-steps", "40",
           "--eval-interval", "20", *TRAIN_FLAGS)
    return root


def test_pipeline_writes_what_it_promises(trained_run):
    meta = json.loads((trained_run / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16" and meta["documents"] == 6
    lines = [json.loads(x) for x in (trained_run / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [x["val_loss"] for x in lines if "val_loss" in x]
    assert len(vals) == 3 and vals[-1] < vals[0]


def test_trained_run_opens_in_transformers_with_same_logits_and_ids(trained_run):
    run = trained_run / "run"
    hf_model = AutoModelForCausalLM.from_pretrained(run).eval()
    hf_tok = AutoTokenizer.from_pretrained(run)
    ours, tok = GPT.from_pretrained(run), Tokenizer.from_pretrained(run)
    text = "Call me Ishmael. Some years ago—never mind how long precisely—"
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    x = torch.tensor([ids[:32]])  # the model's context
    with torch.no_grad():
        assert torch.allclose(hf_model(x).logits, ours(x), atol=1e-4)


def test_generate_streams_text_and_greedy_is_deterministic(trained_run):
    args = ["generate", "--model", trained_run / "run", "The whale", "--max-new-tokens", "12",
            "--greedy"]
    first, second = gptkit(*args), gptkit(*args)
    assert first.stdout.startswith("The whale") and len(first.stdout) > len("The whale\n")
    assert first.stdout == second.stdout
    sampled = gptkit("generate", "--model", trained_run / "run", "The whale", "--max-new-tokens",
                     "12", "--seed", "3", "--num-return-sequences", "2")
    assert sampled.stdout.count("The whale") == 2


def test_eval_reports_json(trained_run):
    result = gptkit("eval", "--model", trained_run / "run", "--data", trained_run / "data", "--json")
    report = json.loads(result.stdout)
    assert set(report) == {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}
    assert report["perplexity"] == pytest.approx(torch.tensor(report["loss"]).exp().item(), rel=1e-5)
    text_file = trained_run / "corpus" / "part0.txt"
    on_text = json.loads(gptkit("eval", "--model", trained_run / "run", "--data", text_file,
                                "--json").stdout)
    assert on_text["tokens"] > 1000


def test_help_lists_every_subcommand():
    out = gptkit("--help").stdout
    for name in ("demo", "tokenizer", "prepare", "train", "generate", "eval"):
        assert f"    {name}" in out


@pytest.mark.parametrize("args, message", [
    (["prepare", "missing_dir", "--tokenizer", "tok", "--out", "x"], "does not exist"),
    (["train", "--data", "nowhere", "--out", "x"], "not a gptkit data directory"),
    (["generate", "--model", "/nonexistent/model", "hi"], "not a model directory"),
    (["eval", "--model", "/nonexistent/model", "--data", "x"], "not a model directory"),
    (["train", "--data", "x", "--preset", "smal"], "did you mean 'small'"),
])
def test_bad_input_is_one_sentence_and_exit_2(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "gptkit", *args], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-2"], "top_k"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
])
def test_bad_sampling_values(trained_run, flags, message):
    result = gptkit("generate", "--model", trained_run / "run", "hello", *flags, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_without_checkpoint_and_mismatched_tokenizer(trained_run, tmp_path):
    result = gptkit("train", "--data", trained_run / "data", "--out", tmp_path / "fresh", "--resume",
                    *TRAIN_FLAGS, check=False)
    assert result.returncode == 2 and "holds no checkpoint" in result.stderr
    # data tokenized with another tokenizer cannot continue the trained model
    (tmp_path / "c.txt").write_text("some other text " * 200)
    gptkit("tokenizer", "train", tmp_path / "c.txt", "--kind", "char", "--out", tmp_path / "ctok")
    gptkit("prepare", tmp_path / "c.txt", "--tokenizer", tmp_path / "ctok", "--out", tmp_path / "cdata")
    result = gptkit("train", "--data", tmp_path / "cdata", "--out", tmp_path / "r2", "--init-from",
                    trained_run / "run", "--max-steps", "1", "--device", "cpu", check=False)
    assert result.returncode == 2 and "different tokenizer" in result.stderr


def test_empty_and_non_utf8_corpus(tmp_path, trained_run):
    (tmp_path / "empty.txt").write_text("")
    result = gptkit("prepare", tmp_path / "empty.txt", "--tokenizer", trained_run / "tok",
                    "--out", tmp_path / "d", check=False)
    assert result.returncode == 2 and "no text" in result.stderr
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait, na\xefve ".encode("latin-1") * 50)
    result = gptkit("prepare", tmp_path / "latin1.txt", "--tokenizer", trained_run / "tok",
                    "--out", tmp_path / "d2")
    assert "100" in result.stderr and "replace" in result.stderr.lower()


def test_readme_shows_every_subcommand():
    """The README's examples and the command line cannot drift apart."""
    from gptkit.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in commands:
        assert f"gptkit {name}" in readme, f"README.md shows no `gptkit {name}` example"


def _actions(parser, command: str = "gptkit"):
    """(command, action) for every argument of every (sub)command."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{command} {name}")
        else:
            yield command, action


def test_every_flag_has_one_help_line_with_at_most_one_default_note():
    from gptkit.cli import build_parser

    for command, action in _actions(build_parser()):
        name = f"{command} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help.strip(), f"{name} has no help text"
        assert action.help.count("default") <= 1, f"{name}: {action.help}"
        assert "(default: )" not in action.help and "default: None" not in action.help, name
