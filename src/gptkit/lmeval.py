"""lm-evaluation-harness's door: gptkit's scorer as an lm-eval `LM`, registered as "gptkit".

    pip install 'gptkit[lmeval]'
    python -m gptkit.lmeval --model gptkit --model_args pretrained=runs/mine \\
        --tasks hellaswag --batch_size 8

`python -m gptkit.lmeval` is lm-eval's own command line with this model registered (its
`lm_eval` command discovers no models outside its package); from Python, `import
gptkit.lmeval` and pass `model="gptkit"` to `lm_eval.simple_evaluate`. Every gptkit family
runs through the same fast scoring as `gptkit eval --benchmark`: requests that share a
context are scored in one row.
"""

from __future__ import annotations

import math
from itertools import groupby
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the one place lm-eval is imported: a sentence, not a traceback
    raise SystemExit("gptkit.lmeval needs lm-evaluation-harness, an optional extra; install "
                     "it with: pip install 'gptkit[lmeval]'") from None

from gptkit import benchmark
from gptkit.benchsets import Requests
from gptkit.checkpoint import resolve_model_dir
from gptkit.inference import load_directory


@register_model("gptkit")
class GptkitLM(LM):
    """`--model_args pretrained=DIR`, `--device`; `--batch_size` contexts per forward pass."""

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 8,
                 **_: Any) -> None:
        super().__init__()
        self.model, self.tokenizer = load_directory(resolve_model_dir(pretrained), device or "auto",
                                                    fast=True)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.share = all(b.attn.window is None for b in self.model.transformer.h)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), greedy) per request; one row per context."""
        pairs = [tuple(r.args) for r in requests]
        results: list[tuple[float, bool]] = [(-math.inf, False)] * len(pairs)
        work: list[tuple[list[int], benchmark.Tree]] = []  # (request index per slot, tree)
        numbered = list(enumerate(pairs))
        for _, group in groupby(numbered, key=lambda p: p[1][0]):
            group = list(group)
            trees, _, _ = benchmark.build_trees(Requests(tuple(p for _, p in group), (), 0),
                                                self.tokenizer, self.model.config.block_size,
                                                self.share)
            work += [([group[s][0] for s in tree.slots], tree) for tree in trees]
        for start in range(0, len(work), self.batch_size):
            batch = work[start:start + self.batch_size]
            scored = benchmark.score_trees(self.model, [tree for _, tree in batch])
            for (indices, _), row in zip(batch, scored, strict=True):
                for i, score in zip(indices, row, strict=True):
                    results[i] = score
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """Log-likelihood of whole texts, in context-sized windows after end-of-text."""
        block = self.model.config.block_size
        out = []
        for request in requests:
            ids = self.tokenizer.encode(request.args[0])
            inputs = [self.tokenizer.eos_token_id] + ids
            total = 0.0
            for start in range(0, len(ids), block):
                x = torch.tensor([inputs[start:start + block]], device=self.model.device)
                y = torch.tensor(ids[start:start + block], device=self.model.device)
                logprobs = self.model(x)[0].float().log_softmax(-1)
                total += logprobs.gather(1, y[:, None]).sum().item()
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy completions, cut at the first of the request's `until` strings."""
        from gptkit.tasks import generate_texts

        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            text = generate_texts(self.model, self.tokenizer, [context], batch_size=1,
                                  max_new_tokens=int(kwargs.get("max_gen_toks", 256)))[0]
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def main() -> None:
    """lm-eval's command line, with "gptkit" among its models."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

