"""Optimizers of the training loop: AdamW alone, or Muon on the hidden matrices plus AdamW.

`--optimizer adamw` (the default) trains every parameter with AdamW, decaying matrices
but not biases and norm gains. `--optimizer muon` (Jordan et al. 2024, `torch.optim.Muon`)
trains the 2-D weights inside the Transformer blocks (attention and MLP projections) with
Muon, which replaces each update by an orthogonalised one (five Newton-Schulz steps), and
everything else (embeddings, LM head, norms, biases) with AdamW at `--lr`. Both follow
the same warm-up and cosine shape, each from its own peak (`--lr`, `--muon-lr`).

Usage: `opt = make_optimizer(model, cfg, device)`, then each step `apply_schedule(opt, step,
cfg)`, backward, `opt.step()`, `opt.zero_grad()`. `opt.parts` are the torch optimizers
whose state a checkpoint saves.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gptkit.config import TrainConfig

if TYPE_CHECKING:
    from gptkit.model import GPT


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]],
                                                 list[tuple[str, nn.Parameter]]]:
    """(Muon's, AdamW's) trainable parameters by name.

    Muon takes the 2-D weights inside the Transformer blocks (`model.transformer.h`): the
    attention and MLP projections (and LoRA's adapters there), the matrices that map one
    hidden vector to another. Embeddings and the LM head are lookups and read-outs rather
    than hidden maps, and norms and biases are not matrices: AdamW takes those.
    """
    hidden: set[int] = set()
    for block in model.transformer.h:
        for module in block.modules():
            if isinstance(module, nn.Embedding):
                continue
            for p in module.parameters(recurse=False):
                if p.dim() == 2:
                    hidden.add(id(p))
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if id(p) in hidden else adamw).append((name, p))
    return muon, adamw


def orthogonalize(x: torch.Tensor, steps: int, coefficients: tuple[float, float, float],
                  eps: float) -> torch.Tensor:
    """Newton-Schulz: a batch of matrices (n, rows, cols) pushed towards U V^T of their SVDs.

    The quintic iteration of torch's and Keller Jordan's Muon (the same coefficients and
    normalisation), on a whole stack of same-shaped matrices at once: three batched
    matmuls per iteration instead of three per matrix.
    """
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix (n, rows, rows) is the small one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` (same hyperparameters, groups and state) with a batched Newton-Schulz step.

    torch's step orthogonalises one matrix at a time in bfloat16, which CPUs without bf16
    instructions compute far slower than float32 (docs/performance.md). Here updates of
    one shape (a tall matrix counting as its transpose) are stacked and orthogonalised
    together, in bfloat16 on CUDA (as torch does) and in float32 elsewhere.
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            momentum, lr = group["momentum"], group["lr"]
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = ([g.lerp(buf, momentum) for g, buf in zip(grads, bufs, strict=True)]
                       if group["nesterov"] else bufs)
            wide = [u.mT if u.size(0) > u.size(1) else u for u in updates]
            by_shape: dict[tuple[torch.Size, torch.device], list[int]] = {}
            for i, u in enumerate(wide):
                by_shape.setdefault((u.shape, u.device), []).append(i)
            for (_, device), indices in by_shape.items():
                dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                stack = torch.stack([wide[i] for i in indices]).to(dtype)
                ortho = orthogonalize(stack, group["ns_steps"], group["ns_coefficients"], group["eps"])
                for i, o in zip(indices, ortho, strict=True):
                    p = params[i]
                    o = o.mT if o.shape != p.shape else o
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(o.to(p.dtype), alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's per-shape learning rate, as torch defines it (`adjust_lr_fn`)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":  # Keller Jordan's: RMS-matched rectangles
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":  # Moonshot's: the update RMS of AdamW
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class Optimizers:
    """The run's torch optimizers, stepped as one: AdamW, or Muon and AdamW side by side."""

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon | None = None) -> None:
        self.adamw = adamw
        self.muon = muon

    @property
    def parts(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers, in the order a checkpoint stores their state."""
        return [self.adamw] if self.muon is None else [self.muon, self.adamw]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts for group in part.param_groups]

    def step(self, skip: torch.Tensor | None = None) -> None:
        """One update of every parameter; none at all where `skip` (a 0-dim bool tensor) is True.

        Fused AdamW alone skips on the device (`found_inf`) without waiting for the host;
        Muon has no such input, so a Muon step reads `skip` on the host first.
        """
        if skip is not None and self.muon is None and self.adamw.param_groups[0].get("fused"):
            self.adamw.found_inf = skip.float()  # read by the fused kernel
            self.adamw.step()
        elif skip is None or not skip.item():
            for part in self.parts:
                part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """The optimizers `cfg.optimizer` names over `model`'s trainable parameters.

    AdamW decays matrices (weights, embeddings) but not biases and norm gains. Muon's
    decoupled weight decay is `--weight-decay` too; its learning rate is `--muon-lr`.
    """
    if cfg.optimizer == "muon":
        hidden, rest = split_parameters(model)
        params = [p for _, p in rest]
    else:
        hidden, params = [], [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is ~10x faster than foreach on CPU too, and it can skip a step
    # without a host sync (`found_inf`); sharded (DTensor) parameters take foreach.
    fused = device.type in ("cuda", "cpu") and not cfg.fsdp
    kind = {"fused": True} if fused else {"foreach": True}
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kind)
    if not hidden:
        return Optimizers(adamw)
    # the default lr adjustment scales each update by sqrt(max(1, rows / cols))
    muon = Muon([p for _, p in hidden], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                weight_decay=cfg.weight_decay)
    return Optimizers(adamw, muon)


def apply_schedule(optimizer: Optimizers, step: int, cfg: TrainConfig) -> float:
    """Set every group's learning rate for `step`; returns AdamW's lr.

    Muon's lr follows the same warm-up and cosine shape as AdamW's, scaled to peak at
    `--muon-lr` (so it ends at `muon_lr * min_lr / lr`).
    """
    lr = lr_at(step, cfg)
    for group in optimizer.adamw.param_groups:
        group["lr"] = lr
    if optimizer.muon is not None:
        for group in optimizer.muon.param_groups:
            group["lr"] = lr * cfg.muon_lr / cfg.lr
            group["momentum"] = cfg.muon_momentum  # a resumed run takes the flag's value
    return lr
