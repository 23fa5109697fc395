"""Items/s and scores: gptkit's benchmark scorer against lm-evaluation-harness's `hf` model.

    python benchmarks/bench_eval.py --model /tmp/smol/dir --limit 200            # HellaSwag
    python benchmarks/bench_eval.py --model /tmp/smol/dir --limit 100 --sets arc_easy,piqa

The same model directory, the same first `--limit` items of each vendored set
(multiple-choice, schema or language-modelling; zero-shot, written to a local task YAML
so lm-eval runs offline), one run each in this process; model loading is not timed.
Prints both scores (they should agree) and the speed ratio. Needs `pip install lm-eval`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

TASK_YAML = """task: bench_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
{fields}
"""
MC_METRICS = "\nmetric_list:\n  - metric: acc\n  - metric: acc_norm"
FIELDS = {
    "multiple_choice": 'output_type: multiple_choice\ndoc_to_text: "{{query}}"\n'
                       'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"' + MC_METRICS,
    # lm-eval reads a digit from doc_to_text as the gold context of a schema item
    "schema": 'output_type: multiple_choice\ndoc_to_text: "{{gold}}"\n'
              'doc_to_choice: "{{context_options}}"\ndoc_to_target: "{{continuation}}"'
              + MC_METRICS,
    # as lm-eval's lambada_openai (the space in the target: a loglikelihood request has no
    # delimiter of its own); acc is "the continuation is the greedy one"
    "language_modeling": 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\n'
                         'doc_to_target: "{{\' \' + continuation}}"\ntarget_delimiter: ""\n'
                         'metric_list:\n'
                         '  - metric: perplexity\n    aggregation: perplexity\n'
                         '    higher_is_better: false\n  - metric: acc\n    aggregation: mean\n'
                         '    higher_is_better: true',
}


def run_gptkit(model_dir: str, name: str, limit: int, batch_size: int | None
               ) -> tuple[dict, float]:
    from gptkit import benchmark
    from gptkit.inference import load_directory

    model, tokenizer = load_directory(Path(model_dir), "cpu", fast=True)
    start = time.perf_counter()
    result = benchmark.run_task(model, tokenizer, name, limit=limit, batch_size=batch_size)
    metrics = {k: m["value"] for k, m in result["metrics"].items()}
    return metrics, time.perf_counter() - start


def run_lm_eval(model_dir: str, name: str, limit: int, batch_size: int
                ) -> tuple[dict, float]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gptkit import benchsets

    items = benchsets.read_items(benchsets.resolve(name))[:limit]
    folder = Path(tempfile.mkdtemp())
    data = folder / f"{name}.jsonl"
    kind = items[0].kind
    rows = {"schema": lambda i: {"context_options": list(i.options),
                                 "continuation": i.continuation, "gold": i.gold},
            "multiple_choice": lambda i: {"query": i.context, "choices": list(i.options),
                                          "gold": i.gold},
            "language_modeling": lambda i: {"context": i.context,
                                            "continuation": i.continuation}}[kind]
    data.write_text("".join(json.dumps(rows(i)) + "\n" for i in items))
    (folder / "task.yaml").write_text(TASK_YAML.format(name=name, path=data, fields=FIELDS[kind]))
    lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", batch_size=batch_size)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"bench_{name}"],
                                  task_manager=TaskManager(include_path=str(folder)))
    seconds = time.perf_counter() - start
    r = out["results"][f"bench_{name}"]
    return {metric: r[f"{metric},none"] for metric in ("acc", "acc_norm", "perplexity")
            if f"{metric},none" in r}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model directory transformers opens")
    parser.add_argument("--limit", type=int, default=200, help="items per set (default: 200)")
    parser.add_argument("--sets", default="hellaswag",
                        help="comma-separated vendored sets (default: hellaswag)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="gptkit's items per pass (default: as many as fill 2,048 tokens)")
    parser.add_argument("--lm-eval-batch-size", type=int, default=32,
                        help="lm-eval's requests (options) per pass (default: 32)")
    args = parser.parse_args()
    for name in args.sets.split(","):
        ours, ours_s = run_gptkit(args.model, name, args.limit, args.batch_size)
        theirs, theirs_s = run_lm_eval(args.model, name, args.limit, args.lm_eval_batch_size)
        # a schema's options are contexts: no acc_norm (lm-eval's divides by their lengths);
        # a language-modelling set has acc and perplexity
        second = "acc_norm" if "acc_norm" in ours else "perplexity"
        for who, metrics, seconds in (("gptkit ", ours, ours_s), ("lm-eval", theirs, theirs_s)):
            shown = f"{metrics[second]:.4f}" if second in metrics else "-"
            print(f"{name} {who}: acc {metrics['acc']:.4f} {second} {shown}  "
                  f"{args.limit / seconds:.2f} items/s ({seconds:.1f}s)")
        print(f"{name} ratio: gptkit is {theirs_s / ours_s:.2f}x lm-eval's items/s", flush=True)


if __name__ == "__main__":
    main()
