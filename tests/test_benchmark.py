"""`gptkit eval --benchmark`: lm-eval's metrics on hand-computed scores, the shared-context
scoring against one forward pass per option, agreement with lm-evaluation-harness's `hf`
model on excerpts of the vendored sets, CORE, the results file and the bad-input sentences."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit import GPT, GPTConfig, Tokenizer, benchmark, benchsets
from gptkit.benchsets import Item
from gptkit.cli import main
from gptkit.errors import GptkitError
from gptkit.inference import load_directory

REPO_EVAL = Path(__file__).resolve().parents[1] / "data" / "eval"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory, repo_data) -> Path:
    """A random 2-layer GPT with a byte-level BPE of 400 tokens and a 256-token context."""
    path = tmp_path_factory.mktemp("bench") / "model"
    text = (repo_data / "shakespeare" / "input.txt").read_text()[:100_000]
    tokenizer = Tokenizer.train(texts=[text], kind="bpe", vocab_size=400)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=256, n_layer=2, n_head=4,
                       n_embd=32, eos_token_id=tokenizer.eos_token_id)
    GPT(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def excerpt(name: str, n: int, out: Path) -> Path:
    """The first n items of a vendored JSONL set, as a file of their own."""
    lines = (REPO_EVAL / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


# -- metrics on numbers computed by hand ------------------------------------------------

def test_item_metrics_follow_lm_eval_definitions():
    item = Item("multiple_choice", "q", ("ab", "abcdef"), "", 1)
    requests = benchsets.requests(item, [])
    # acc: -10 > -12 picks 0; acc_norm by characters: -5 < -2 picks 1; per token: -10 < -3
    scores = benchmark.item_metrics(item, requests, np.array([-10.0, -12.0]),
                                    np.array([False, False]), np.array([1.0, 4.0]))
    assert scores == {"acc": 0.0, "acc_token": 1.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    item = Item("multiple_choice", "q", ("éé", "abc"), "", 0)
    # characters: -3 < -1.67 picks 1; UTF-8 bytes (4 and 3): -1.5 > -1.67 picks 0
    scores = benchmark.item_metrics(item, benchsets.requests(item, []), np.array([-6.0, -5.0]),
                                    np.array([False, False]), np.array([2.0, 2.0]))
    assert scores["acc"] == 0.0 and scores["acc_norm"] == 0.0 and scores["acc_bytes"] == 1.0


def test_summary_values_and_standard_errors():
    summary = benchmark.summarize([{"acc": 1.0, "loglikelihood": -2.0},
                                   {"acc": 0.0, "loglikelihood": -4.0},
                                   {"acc": 1.0, "loglikelihood": -2.0},
                                   {"acc": 1.0, "loglikelihood": -4.0}])
    assert summary["acc"] == {"value": 0.75, "stderr": pytest.approx(0.25)}  # s / sqrt(n)
    assert summary["perplexity"]["value"] == pytest.approx(math.exp(3.0))


def test_fewshot_examples_are_reproducible_and_never_the_item():
    items = [Item("multiple_choice", f"q{i}", ("a", "b"), "", 0) for i in range(12)]
    for i in range(12):
        shots = benchsets.shots_for(items, i, 5)
        assert items[i] not in shots and len(set(shots)) == 5
        assert shots == benchsets.shots_for(items, i, 5)
    text = benchsets.requests(items[0], benchsets.shots_for(items, 0, 2)).pairs[0][0]
    assert text.count("\n\n") == 2 and text.endswith("q0")


# -- shared-context scoring ------------------------------------------------------------

def test_tree_scoring_equals_one_forward_per_option(bpe_model, tmp_path):
    fast, tokenizer = load_directory(bpe_model, "cpu", fast=True)
    plain, _ = load_directory(bpe_model, "cpu")
    items = benchsets.read_items(excerpt("arc_easy", 6, tmp_path / "arc.jsonl"))
    items += benchsets.read_items(excerpt("winogrande", 3, tmp_path / "wg.jsonl"))
    for i, item in enumerate(items):
        requests = benchsets.requests(item, benchsets.shots_for(items, i, 1))
        trees, cut, skipped = benchmark.build_trees(requests, tokenizer, 256, share=True)
        assert not cut and not skipped
        scored = benchmark.score_trees(fast, trees)
        got = {slot: s for tree, row in zip(trees, scored, strict=True)
               for slot, s in zip(tree.slots, row, strict=True)}
        for slot, (context, continuation) in enumerate(requests.pairs):
            ctx, cont = benchmark.encode_pair(tokenizer, context, continuation)
            logprobs = plain(torch.tensor([ctx + cont])).log_softmax(-1)[0]
            want = sum(logprobs[len(ctx) - 1 + t, tok].item() for t, tok in enumerate(cont))
            assert got[slot][0] == pytest.approx(want, abs=1e-4)


def test_batching_does_not_change_scores(bpe_model, tmp_path):
    model, tokenizer = load_directory(bpe_model, "cpu", fast=True)
    path = str(excerpt("arc_easy", 12, tmp_path / "arc.jsonl"))
    one = benchmark.run_task(model, tokenizer, path, batch_size=1, progress=False)
    filled = benchmark.run_task(model, tokenizer, path, progress=False)  # by token budget
    assert one["metrics"] == filled["metrics"]


def test_agrees_with_lm_evaluation_harness(bpe_model, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arc = excerpt("arc_easy", 40, tmp_path / "arc.jsonl")
    wg = excerpt("winogrande", 40, tmp_path / "wg.jsonl")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = "test_split: test\noutput_type: multiple_choice\n"
    (tasks / "mc.yaml").write_text(
        f"task: gk_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {arc}\n"
        + common + 'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    (tasks / "schema.yaml").write_text(
        f"task: gk_schema\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {wg}\n"
        + common + 'doc_to_text: "{{gold}}"\ndoc_to_choice: "{{context_options}}"\n'
        'doc_to_target: "{{continuation}}"\nmetric_list:\n  - metric: acc\n')
    reference = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={bpe_model},dtype=float32", device="cpu",
        tasks=["gk_mc", "gk_schema"], task_manager=TaskManager(include_path=str(tasks)),
        batch_size=8, log_samples=True)
    model, tokenizer = load_directory(bpe_model, "cpu", fast=True)
    ours = {"gk_mc": benchmark.run_task(model, tokenizer, str(arc), progress=False),
            "gk_schema": benchmark.run_task(model, tokenizer, str(wg), progress=False)}
    for task, metrics in (("gk_mc", ("acc", "acc_norm")), ("gk_schema", ("acc",))):
        for metric in metrics:
            theirs = reference["results"][task][f"{metric},none"]
            assert ours[task]["metrics"][metric]["value"] == pytest.approx(theirs, abs=0.005)
            assert ours[task]["metrics"][metric]["stderr"] == pytest.approx(
                reference["results"][task][f"{metric}_stderr,none"], abs=1e-6)
    # the same log-likelihood for every option of every multiple-choice item
    items = benchsets.read_items(arc)
    for sample in reference["samples"]["gk_mc"]:
        requests = benchsets.requests(items[sample["doc_id"]], [])
        trees, _, _ = benchmark.build_trees(requests, tokenizer, 256, share=True)
        ours_ll = [ll for row in benchmark.score_trees(model, trees) for ll, _ in row]
        theirs_ll = [resp[0] for resp in sample["filtered_resps"]]
        assert ours_ll == pytest.approx(theirs_ll, abs=1e-3)
    # the door: lm-eval running gptkit's model class gives the hf model's figures
    from gptkit.lmeval import GptkitLM

    door = lm_eval.simple_evaluate(
        model=GptkitLM(str(bpe_model), device="cpu"), tasks=["gk_mc", "gk_schema"],
        task_manager=TaskManager(include_path=str(tasks)))
    for task, metrics in (("gk_mc", ("acc", "acc_norm")), ("gk_schema", ("acc",))):
        for metric in metrics:
            assert door["results"][task][f"{metric},none"] == pytest.approx(
                reference["results"][task][f"{metric},none"], abs=0.005)


# -- the command, CORE and the results file ----------------------------------------------

def test_bf16_scoring_keeps_the_log_likelihoods(bpe_model, tmp_path):
    from gptkit.kernels.linear import bf16_supported

    text = (REPO_EVAL.parent / "shakespeare" / "input.txt").read_text()[:2000]
    path = tmp_path / "lm.jsonl"  # language modelling: a perplexity to compare
    path.write_text("".join(json.dumps({"context": text[i:i + 120], "continuation": text[i + 120:i + 160]})
                            + "\n" for i in range(0, 1800, 300)))
    path = str(path)
    scores = {}
    for dtype in ("float32", "bfloat16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a CPU without native bf16 says it uses fp32
            model, tokenizer = load_directory(bpe_model, "cpu", dtype, fast=True)
        scores[dtype] = benchmark.run_task(model, tokenizer, path, progress=False)["metrics"]
    fp32, bf16 = (scores[d]["perplexity"]["value"] for d in ("float32", "bfloat16"))
    if bf16_supported(torch.device("cpu")):
        assert model.transformer.wte.weight.dtype == torch.bfloat16
        assert fp32 != bf16 and abs(bf16 - fp32) < 0.02 * fp32  # rounded, not broken
    else:  # the fallback scores in fp32
        assert bf16 == fp32


def test_benchmark_command_prints_table_and_saves_results(bpe_model, capsys):
    main(["eval", "--model", str(bpe_model), "--benchmark", "copa,lambada_openai",
          "--limit", "8"])
    table = capsys.readouterr().out
    assert "copa" in table and "acc_norm" in table and "perplexity" in table
    saved = json.loads((bpe_model / benchmark.RESULTS_NAME).read_text())
    assert [t["task"] for t in saved["tasks"]] == ["copa", "lambada_openai"]
    assert saved["tasks"][0]["n"] == 8 and saved["tasks"][0]["random_baseline"] == 0.5
    main(["info", str(bpe_model)])
    assert "copa" in capsys.readouterr().out


def test_core_reports_how_many_of_22_tasks(bpe_model, tmp_path, capsys):
    out = tmp_path / "core.json"
    main(["eval", "--model", str(bpe_model), "--benchmark", "core", "--limit", "3",
          "--out", str(out)])
    assert "CORE (10 of 22 tasks)" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    centered = [t["core"]["centered"] for t in saved["tasks"]]
    assert saved["core"]["value"] == pytest.approx(sum(centered) / 10)
    shots = {t["task"]: t["shots"] for t in saved["tasks"]}
    assert shots["hellaswag_zeroshot"] == 0 and shots["hellaswag"] == 10


def test_hellaswag_text_is_read_as_llama_cpp_writes_it():
    items = benchsets.read_items(benchsets.resolve("hellaswag"))
    assert len(items) == 10042
    assert items[0].context.startswith("Roof shingle removal:") and items[0].gold == 3
    assert all(len(item.options) == 4 for item in items)


# -- bad input -----------------------------------------------------------------------------

def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("records, match", [
    ([{"query": "q", "choices": ["a", "b"], "gold": 0}, {"question": "q"}],
     r"line 2 is in none of the three formats"),
    ([{"query": "q", "choices": ["a", "b"], "gold": 2}], r"line 1: gold 2 is not an index"),
    ([{"context_options": ["a", "b"], "continuation": "c", "gold": -1}], r"gold -1"),
])
def test_bad_jsonl_lines_get_one_sentence(bpe_model, tmp_path, capsys, records, match):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    err = refused(["eval", "--model", str(bpe_model), "--benchmark", str(path)], capsys)
    assert err.count("\n") == 1
    assert re.search(match, err)


def test_bad_arguments_get_one_sentence(bpe_model, tmp_path, capsys):
    model = str(bpe_model)
    assert "choose from arc_challenge, arc_easy" in refused(
        ["eval", "--model", model, "--benchmark", "hellaswagg"], capsys)
    assert "at least 1" in refused(
        ["eval", "--model", model, "--benchmark", "copa", "--limit", "0"], capsys)
    three = write_jsonl(tmp_path / "three.jsonl",
                        [{"query": f"q{i}", "choices": ["a", "b"], "gold": 0} for i in range(3)])
    assert "5 shots need 6 items but the set has 3" in refused(
        ["eval", "--model", model, "--benchmark", str(three), "--num-fewshot", "5"], capsys)
    assert "drop --num-fewshot" in refused(
        ["eval", "--model", model, "--benchmark", "core", "--num-fewshot", "1"], capsys)
    assert "needs --data" in refused(["eval", "--model", model], capsys)


def test_contexts_that_do_not_fit_are_counted(bpe_model, tmp_path, capsys):
    long = "word " * 400
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"query": long, "choices": ["a", "b"], "gold": 0},
        {"query": "short", "choices": ["a", "b"], "gold": 1},
    ])
    main(["eval", "--model", str(bpe_model), "--benchmark", str(path), "--json",
          "--out", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    result = json.loads(captured.out)["tasks"][0]
    assert result["cut"] == 1 and result["skipped"] == 0 and result["n"] == 2
    assert "1 context(s) cut" in captured.err
    too_long = write_jsonl(tmp_path / "too_long.jsonl",
                           [{"context": "a", "continuation": long}])
    err = refused(["eval", "--model", str(bpe_model), "--benchmark", str(too_long)], capsys)
    assert "No item" in err and "fits the model's context of 256 tokens" in err


def test_sets_resolve_from_the_repository_only():
    for name, (filename, _) in benchsets.SETS.items():
        assert benchsets.resolve(name) == REPO_EVAL / filename
    with pytest.raises(GptkitError, match="Unknown benchmark"):
        benchsets.resolve("no_such_set")


def test_training_logs_benchmark_scores_at_each_evaluation(char_data, tmp_path):
    from gptkit.config import TrainConfig
    from gptkit.train import train

    cfg = TrainConfig(data=str(char_data), out=str(tmp_path / "run"), preset="tiny", n_layer=1,
                      n_head=2, n_embd=16, block_size=32, batch_size=4, eval_steps=1,
                      max_steps=4, eval_interval=2, device="cpu", warmup_steps=1,
                      eval_benchmark="copa", eval_benchmark_limit=5)
    train(cfg, progress=False)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if "val_loss" in line]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all(0.0 <= e["benchmark/copa/acc_norm"] <= 1.0 for e in evals)
    with pytest.raises(GptkitError, match="Unknown benchmark"):
        train(TrainConfig(data=str(char_data), out=str(tmp_path / "bad"), preset="tiny",
                          device="cpu", eval_benchmark="copaa"), progress=False)
    assert not (tmp_path / "bad").exists()
