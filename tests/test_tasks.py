"""Task templates, JSONL parsing with file:line errors, the task file, and the metrics."""

from __future__ import annotations

import json

import pytest
from tiny_models import write_jsonl

from gptkit import GptkitError
from gptkit.evaluate import normalize_answer, qa_scores, rouge_scores, translation_scores
from gptkit.tasks import (
    TASK_FILE,
    TASKS,
    get_task,
    load_task,
    read_examples,
    read_inputs,
    task_file_writer,
)


def test_templates_format_each_task_and_leave_out_empty_optional_paragraphs():
    translate = get_task("translate")
    assert translate.format_prompt({"source": "Hi."}) == "English: Hi.\nChinese:"
    assert translate.format_prompt({"source": "Hi.", "target_lang": "French"}) == \
        "English: Hi.\nFrench:"
    assert translate.target_text("你好。") == " 你好。"
    assert get_task("summarize").format_prompt({"document": "Long text."}) == "Long text.\nTL;DR:"
    assert get_task("qa").format_prompt({"context": "C.", "question": "Q?"}) == \
        "C.\nQuestion: Q?\nAnswer:"
    instruct = get_task("instruct")
    assert instruct.format_prompt({"instruction": "Add.", "input": "1 2"}) == \
        "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n"
    assert instruct.format_prompt({"instruction": "Say hi."}) == \
        "### Instruction:\nSay hi.\n\n### Response:\n"
    # braces in the data are text, not template fields
    assert get_task("completion").format_prompt({"prompt": "f({x})"}) == "f({x})"


def test_reading_records_by_task_and_renamed_fields(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"context": "Paris is in France.", "question": "Where is Paris?",
         "answers": ["France", "in France"]},
        {"context": "c", "question": "q", "answers": "one answer"},
    ])
    examples = read_examples(path, get_task("qa"))
    assert examples[0].prompt == {"context": "Paris is in France.", "question": "Where is Paris?"}
    assert examples[0].targets == ["France", "in France"] and examples[1].targets == ["one answer"]
    assert examples[0].where == f"{path} line 1"
    renamed = write_jsonl(tmp_path / "sum.jsonl", [{"abstract": "A b c.", "tldr": "A."}] * 3)
    spec = get_task("summarize", prompt_field="abstract", target_field="tldr")
    examples = read_examples(renamed, spec, limit=2)
    assert len(examples) == 2 and examples[0].prompt == {"document": "A b c."}
    assert examples[0].targets == ["A."]


@pytest.mark.parametrize("lines, message", [
    ([], "holds no records"),
    (['{"source": "a", "target": "b"}', "{not json"], r"line 2 is not valid JSON"),
    (['["source", "target"]'], r"line 1 is a JSON list; expected an object with the fields "
                               r"source, target"),
    (['{"source": "a"}'], r"line 1 has no field 'target'"),
    (['{"text": "a", "target": "b"}'], r"line 1 has no field 'source'"),
    (['{"source": 3, "target": "b"}'], r"line 1: field 'source' is a int; expected a string"),
    (['{"source": "a", "target": ["b"]}'], r"field 'target' is a list; expected a string"),
    (['{"source": "a", "target": "  "}'], r"line 1: field 'target' is empty"),
])
def test_bad_jsonl_names_the_file_line_and_field(tmp_path, lines, message):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(GptkitError, match=message) as info:
        read_examples(path, get_task("translate"))
    assert str(path) in str(info.value)


def test_qa_answers_must_be_a_list_of_strings(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"context": "c", "question": "q", "answers": []}])
    with pytest.raises(GptkitError, match="line 1: field 'answers' must be a non-empty list"):
        read_examples(path, get_task("qa"))


def test_unknown_task_lists_the_tasks_and_suggests():
    with pytest.raises(GptkitError, match="Unknown task 'sumarize' \\(did you mean 'summarize'"
                                          "\\?\\); expected one of translate, summarize, qa, "
                                          "instruct, completion"):
        get_task("sumarize")


def test_task_file_round_trips_and_templates_are_chosen_by_model(tmp_path, capsys):
    spec = get_task("summarize", prompt_field="abstract")
    for name, write in task_file_writer(spec).items():
        write(tmp_path / name)
    stored = json.loads((tmp_path / TASK_FILE).read_text())
    assert stored["task"] == "summarize" and stored["template"] == TASKS["summarize"].template
    assert load_task(tmp_path) == spec
    assert load_task(tmp_path, "summarize", prompt_field="doc").fields == {"document": "doc"}
    with pytest.raises(GptkitError, match="fine-tuned for 'summarize' and knows no template for "
                                          "'qa'"):
        load_task(tmp_path, "qa")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(GptkitError, match="has no task template .* pass --task"):
        load_task(plain)
    assert load_task(plain, "qa").template == TASKS["qa"].template
    assert "not fine-tuned for a task; using the built-in 'qa'" in capsys.readouterr().err
    (plain / TASK_FILE).write_text('{"task": "poetry", "template": "{x}"}')
    with pytest.raises(GptkitError, match="is not a gptkit task file"):
        load_task(plain)


def test_task_inputs_from_text_text_file_or_jsonl(tmp_path):
    spec = get_task("qa")
    with pytest.raises(GptkitError, match="input 1 has no field 'context'"):
        read_inputs("Where?", spec)
    summarize = get_task("summarize")
    assert read_inputs("Some text.", summarize)[0].prompt == {"document": "Some text."}
    (tmp_path / "doc.txt").write_text("A whole\nfile.")
    assert read_inputs(str(tmp_path / "doc.txt"), summarize)[0].prompt == {"document": "A whole\nfile."}
    record = read_inputs('{"context": "Paris is in France.", "question": "Where?"}', spec)
    assert record[0].prompt == {"context": "Paris is in France.", "question": "Where?"}
    assert read_inputs("{not json", summarize)[0].prompt == {"document": "{not json"}
    path = write_jsonl(tmp_path / "in.jsonl", [{"context": "c", "question": "q"}] * 2)
    assert [e.prompt for e in read_inputs(str(path), spec)] == [{"context": "c", "question": "q"}] * 2


def test_bleu_and_chrf_tokenize_chinese_by_character():
    assert translation_scores(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == \
        pytest.approx(100.0)
    # without the zh tokenizer an unsegmented Chinese sentence is one word and scores 0
    scores = translation_scores(["我喜欢这只猫。"], ["我喜欢那只猫。"])
    assert 30 < scores["bleu"] < 100 and 30 < scores["chrf"] < 100
    assert translation_scores(["完全不同"], ["我喜欢猫"])["bleu"] == 0.0


def test_rouge_is_character_level_for_chinese_and_takes_the_best_reference():
    assert rouge_scores(["今天天气很好"], [["今天天气很好"]])["rouge1"] == pytest.approx(1.0)
    partial = rouge_scores(["今天天气好"], [["今天天气很好"]])
    assert 0.5 < partial["rouge1"] < 1.0 and 0.5 < partial["rougeL"] < 1.0
    english = rouge_scores(["the cats are running"], [["a dog", "the cat is running"]])
    assert english["rouge1"] == pytest.approx(0.75)  # stemmed: the, cat, running of 4
    assert english["rouge2"] == pytest.approx(1 / 3)


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("  The Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("an apple and a pear") == "apple and pear"
    scores = qa_scores(["The cat", "big cat", "nothing"], [["cat"], ["a cat", "dog"], ["x"]])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    # F1: 1 (exact), 2/3 (precision 1/2, recall 1), 0
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
