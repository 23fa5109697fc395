"""Fine-tuning: masked targets, resumable batches, a synthetic task learnt, the CLI and its errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import make_model_dir, write_jsonl

from gptkit import GPT, Tokenizer
from gptkit.cli import main
from gptkit.finetune import finetune, train_settings
from gptkit.kernels import IGNORE_INDEX
from gptkit.sft import SFTBatches, encode_pair
from gptkit.tasks import TASK_FILE, get_task, load_task, parse_record, run_task

LETTERS = "abcdefgh"


def reversal_records(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))) for _ in range(n)]
    return [{"prompt": w + "=", "completion": w[::-1]} for w in words]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reversal_model(tmp_path_factory):
    """A 2-layer GPT fine-tuned from random weights to reverse strings (about 20 s on 2 cores)."""
    root = tmp_path_factory.mktemp("reverse")
    base = make_model_dir(root / "base", n_embd=64, block_size=16, chars=LETTERS + "=")
    data = write_jsonl(root / "train.jsonl", reversal_records(2000, seed=0))
    finetune(train_settings(
        init_from=str(base), data=str(data), out=str(root / "run"), task="completion",
        max_steps=300, batch_size=32, lr=6e-3, min_lr=1e-4, warmup_steps=20, eval_interval=0,
        save_interval=0, log_interval=50, device="cpu", seed=1), progress=False)
    return root


def test_reversal_reaches_90_percent_exact_match(reversal_model):
    run = reversal_model / "run"
    model, tokenizer = GPT.from_pretrained(run), Tokenizer.from_pretrained(run)
    test = reversal_records(100, seed=123)
    predictions = run_task(model, tokenizer, load_task(run), [r["prompt"] for r in test],
                           max_new_tokens=7)
    exact = sum(p == r["completion"] for p, r in zip(predictions, test, strict=True)) / len(test)
    assert exact >= 0.9, list(zip(predictions, test, strict=True))[:10]


def test_fine_tuned_directory_is_a_transformers_model_with_its_template(reversal_model):
    transformers = pytest.importorskip("transformers")
    run = reversal_model / "run"
    assert json.loads((run / TASK_FILE).read_text())["task"] == "completion"
    hf = transformers.AutoModelForCausalLM.from_pretrained(run).eval()
    ids = Tokenizer.from_pretrained(run).encode("abcd=", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, GPT.from_pretrained(run)(ids),
                                   atol=1e-5, rtol=1e-5)


def test_cli_generate_and_eval_use_the_stored_template(reversal_model, capsys):
    run = reversal_model / "run"
    main(["generate", "--model", str(run), "--input", "abcdef=", "--greedy",
          "--max-new-tokens", "8", "--device", "cpu"])
    assert capsys.readouterr().out.strip() == "fedcba"
    test = write_jsonl(reversal_model / "test.jsonl", reversal_records(20, seed=5))
    main(["eval", "--model", str(run), "--task", "completion", "--data", str(test),
          "--device", "cpu", "--out", str(reversal_model / "preds.jsonl")])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 20 and result["perplexity"] < 1.5
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"])
    predictions = [json.loads(line) for line in (reversal_model / "preds.jsonl").open()]
    assert predictions[0]["prompt"].endswith("=") and len(predictions) == 20


def test_only_target_tokens_carry_loss_and_long_prompts_lose_their_start():
    tokenizer = Tokenizer.train(texts=["abcdefgh=xyz"], kind="char", vocab_size=20)
    spec = get_task("completion")
    example = parse_record({"prompt": "abcdefgh=", "completion": "xyz"}, spec, "test")
    (ids, labels), cut = encode_pair(tokenizer, *spec.render(example), max_tokens=100)
    eos = tokenizer.eos_token_id
    assert not cut and tokenizer.decode(ids[:9]) == "abcdefgh=" and ids[-1] == eos
    assert labels == [IGNORE_INDEX] * 9 + tokenizer.encode("xyz") + [eos]
    (ids, labels), cut = encode_pair(tokenizer, *spec.render(example), max_tokens=7)
    assert cut and tokenizer.decode(ids[:3]) == "gh=" and labels[3:] == tokenizer.encode("xyz") + [eos]
    (ids, labels), cut = encode_pair(tokenizer, *spec.render(example), max_tokens=3)
    assert cut and len(ids) == 3 and labels == [IGNORE_INDEX, *tokenizer.encode("xy")]


def test_batches_shuffle_per_epoch_from_the_seed_and_resume_exactly():
    examples = [([i, i, 0], [IGNORE_INDEX, i, 0]) for i in range(1, 11)]
    batches = SFTBatches(examples, batch_size=5, seed=3, pad_id=0)
    first_epoch = torch.cat([batches.next_batch()[0][:, 0] for _ in range(2)]).tolist()
    assert sorted(first_epoch) == list(range(1, 11))
    state = batches.state_dict()
    ahead = [batches.next_batch() for _ in range(3)]
    second = torch.cat([b[0][:, 0] for b in ahead[:2]]).tolist()
    assert sorted(second) == list(range(1, 11)) and second != first_epoch
    resumed = SFTBatches(examples, batch_size=5, seed=3, pad_id=0)
    resumed.load_state_dict(state)
    for x, y in ahead:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    assert ahead[0][1][0].tolist() == [ahead[0][0][0, 0].item(), 0]  # y is x shifted, masked


def test_variable_length_batches_are_right_padded_with_masked_targets():
    examples = [([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]), ([5, 9], [IGNORE_INDEX, 9])]
    x, y = SFTBatches(examples, batch_size=2, seed=0, pad_id=0).next_batch()
    rows = sorted(zip(x.tolist(), y.tolist(), strict=True))
    assert rows == [([5, 0, 0], [9, IGNORE_INDEX, IGNORE_INDEX]), ([5, 6, 7], [IGNORE_INDEX, 7, 8])]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_lora_run_saves_merged_model_and_peft_adapter_and_resumes_exactly(tmp_path, capsys):
    base = make_model_dir(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"instruction": f"Count to {n}.", "output": " ".join(str(i) for i in range(1, n + 1))}
        for n in range(1, 9)])
    common = ["finetune", "--model", str(base), "--task", "instruct", "--data", str(data),
              "--lora-rank", "4", "--batch-size", "4", "--log-interval", "1", "--device", "cpu",
              "--eval-interval", "0", "--warmup-steps", "0", "--lr", "1e-2", "--dropout", "0.1",
              "--lora-dropout", "0.1"]
    main([*common, "--out", str(tmp_path / "straight"), "--epochs", "2", "--save-adapter"])
    assert "fine-tuned 4 steps" in capsys.readouterr().out  # 2 epochs of 8 examples, 4 a step
    straight = tmp_path / "straight"
    assert {"config.json", "model.safetensors", "tokenizer.json", TASK_FILE} <= {
        p.name for p in straight.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (straight / "adapter").iterdir()}
    assert json.loads((straight / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert GPT.from_pretrained(straight).num_params() == GPT.from_pretrained(base).num_params()
    resumed = tmp_path / "resumed"
    main([*common, "--out", str(resumed), "--epochs", "2", "--max-time", "0"])
    for _ in range(3):
        main([*common, "--out", str(resumed), "--epochs", "2", "--max-time", "0", "--resume"])
    losses = [[m["loss"] for m in metrics(run) if "loss" in m] for run in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4 and losses[0][-1] < losses[0][0]
    a, b = GPT.from_pretrained(straight), GPT.from_pretrained(resumed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


def test_eval_of_a_generation_task_on_a_base_model_scores_and_writes_predictions(tmp_path, capsys):
    base = make_model_dir(tmp_path / "base")
    test = write_jsonl(tmp_path / "qa.jsonl", [
        {"context": "Bob is 3.", "question": "Age?", "answers": ["3", "three"]}] * 5)
    main(["eval", "--model", str(base), "--task", "qa", "--data", str(test), "--limit", "3",
          "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "p.jsonl")])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert set(result) == {"exact_match", "f1", "n"} and result["n"] == 3
    assert 0 <= result["f1"] <= 1 and "using the built-in 'qa' template" in captured.err
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").open()]
    assert rows[0]["prompt"] == "Bob is 3.\nQuestion: Age?\nAnswer:"
    assert rows[0]["references"] == ["3", "three"] and len(rows) == 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    make_model_dir(root / "base")
    write_jsonl(root / "ok.jsonl", [{"prompt": "a", "completion": "b"}])
    (root / "empty.jsonl").write_text("")
    (root / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    write_jsonl(root / "missing.jsonl", [{"prompt": "a"}])
    write_jsonl(root / "number.jsonl", [{"prompt": 1, "completion": "b"}])
    write_jsonl(root / "blank.jsonl", [{"prompt": "a", "completion": ""}])
    return root


@pytest.mark.parametrize("args, message", [
    (["--data", "empty.jsonl"], "empty.jsonl holds no records"),
    (["--data", "broken.jsonl"], "broken.jsonl line 2 is not valid JSON"),
    (["--data", "missing.jsonl"], "missing.jsonl line 1 has no field 'completion'"),
    (["--data", "number.jsonl"], "line 1: field 'prompt' is a int; expected a string"),
    (["--data", "blank.jsonl"], "line 1: field 'completion' is empty"),
    (["--task", "poem"], "Unknown task 'poem'; expected one of translate, summarize, qa, "
                         "instruct, completion"),
    (["--lora-rank", "0"], "--lora-rank is 0; expected an integer of at least 1"),
    (["--save-adapter"], "--save-adapter and --lora-alpha need LoRA"),
    (["--epochs", "1", "--max-steps", "5"], "either --epochs or --max-steps"),
    (["--model", "./nowhere"], "'./nowhere' is not a model directory"),
    (["--resume"], "--resume: out holds no checkpoint"),
])
def test_finetune_bad_input_is_one_sentence_and_exit_code_2(tiny_dir, monkeypatch, capsys, args,
                                                             message):
    monkeypatch.chdir(tiny_dir)
    defaults = {"--model": "base", "--task": "completion", "--data": "ok.jsonl"}
    argv = ["finetune", "--out", "out", "--device", "cpu", *args]
    argv += [x for flag, value in defaults.items() if flag not in args for x in (flag, value)]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_task_run_on_a_model_without_template_explains(tiny_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(tiny_dir / "base"), "--input", "hello", "--device", "cpu"])
    assert info.value.code == 2
    assert "has no task template (gptkit_task.json); pass --task" in capsys.readouterr().err
