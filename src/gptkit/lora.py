"""LoRA (Hu et al. 2021): low-rank adapters on the attention and MLP projections.

`apply_lora` freezes every weight of a GPT and wraps its four projections per block
(attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) in `LoRALinear`, which adds
`scaling * B(A(dropout(x)))` with A (r, in) and B (out, r), B starting at zero so the
model is unchanged before training. Only A and B train.

Saving: `merged_model` gives a plain GPT with B @ A folded into the weights, so a
fine-tuned directory stays an ordinary directory of its family; `save_peft_adapter`
writes the adapters as Hugging Face `peft` does (`adapter_config.json` +
`adapter_model.safetensors`, the family's module names), so
`PeftModel.from_pretrained(hf_model, dir)` reproduces them. For Llama-style families
our fused projections become the family's separate ones: the adapter of c_attn (A, B)
is q_proj's, k_proj's and v_proj's with A shared and B split by rows, which is exact
because B @ A splits the same way.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptkit.checkpoint import commit_files, write_json
from gptkit.errors import GptkitError
from gptkit.model import GPT

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update; `merge` folds it in."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft initialises A
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # (B, T, in) @ (in, r) @ (r, out): two thin matmuls instead of a full (out, in) delta
        return y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update B @ A * scaling, shaped like the base weight (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer by module path (e.g. 'transformer.h.0.attn.c_attn')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: GPT, rank: int, alpha: float | None = None, dropout: float = 0.0) -> GPT:
    """Freeze `model` and wrap its projections in LoRA layers, in place; returns it."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise GptkitError(f"--lora-rank is {rank!r}; expected an integer of at least 1.")
    if not 0.0 <= dropout < 1.0:
        raise GptkitError(f"--lora-dropout is {dropout!r}; expected a number in [0, 1).")
    if lora_layers(model):
        raise GptkitError("the model already has LoRA adapters; apply LoRA once.")
    alpha = float(2 * rank if alpha is None else alpha)
    model.requires_grad_(False)
    for block in model.transformer.h:
        for path in model.config.family.lora_targets:
            parent_name, child = path.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged_model(model: GPT) -> GPT:
    """A copy of `model` with every adapter folded into a plain `nn.Linear` (for saving)."""
    layers = lora_layers(model)
    if not layers:
        return model
    out = copy.deepcopy(model)
    for name, layer in lora_layers(out).items():
        parent_name, _, child = name.rpartition(".")
        layer.merge()
        setattr(out.get_submodule(parent_name), child, layer.base)
    out.requires_grad_(True)
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under our module paths."""
    return {f"{name}.{part}": getattr(layer, part).detach().cpu().contiguous()
            for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors saved by `lora_state_dict` back, checking names and shapes."""
    expected = lora_state_dict(model)
    if set(state) != set(expected):
        raise GptkitError(f"{source} holds adapters for different layers or ranks than this run "
                          "(check --lora-rank and --model).")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise GptkitError(f"{source}: adapter '{name}' has shape {tuple(tensor.shape)}; "
                              f"expected {tuple(expected[name].shape)} (check --lora-rank).")
        layer = model.get_submodule(name.rpartition(".")[0])
        getattr(layer, name.rpartition(".")[2]).copy_(tensor)


def peft_config(model: GPT, base_model: str | None) -> dict[str, Any]:
    """The `adapter_config.json` that `peft.LoraConfig` reads for these adapters."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise GptkitError("the model has no LoRA adapters to save.")
    rank = layers[0].lora_A.shape[0]
    family = model.config.family
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": layers[0].scaling * rank,
        "lora_dropout": layers[0].dropout.p,
        "target_modules": family.peft_targets(),
        # weights stored (in, out), as GPT-2's Conv1D: peft must transpose when merging
        "fan_in_fan_out": family.peft_fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def peft_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The adapters under peft's names, base_model.model.<HF module path>.lora_A.weight."""
    state = lora_state_dict(model)
    layout = model.config.family.hf_layout(model.config)
    tensors = {}
    for name in lora_layers(model):
        a, b = state[name + ".lora_A"].float(), state[name + ".lora_B"].float()
        parts = layout[name + ".weight"]
        for (weight, _, _), piece in zip(parts, b.split([rows for _, rows, _ in parts]),
                                         strict=True):
            module = "base_model.model." + weight.removesuffix(".weight")
            tensors[module + ".lora_A.weight"] = a.clone()  # shared by the split projections
            tensors[module + ".lora_B.weight"] = piece.contiguous()
    return tensors


def save_peft_adapter(model: GPT, directory: str | Path, base_model: str | None = None) -> None:
    """Write the adapters in peft's format, atomically; `base_model` names the frozen model."""
    from safetensors.torch import save_file

    config = peft_config(model, base_model)
    tensors = peft_tensors(model)
    commit_files(directory, {
        ADAPTER_CONFIG_NAME: lambda p: write_json(p, config),
        ADAPTER_WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
    })
