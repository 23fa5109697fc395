"""One training loop for pretraining and fine-tuning.

AdamW or Muon + AdamW (`gptkit.optim`), linear warmup then cosine decay, gradient
accumulation and clipping, mixed precision, optional `torch.compile`, periodic
evaluation, `metrics.jsonl`, atomic checkpoints, and exact resume: the run directory
holds the model (a Hugging Face GPT-2 directory) plus `train_state.pt` with the
optimizer, step, RNG states and data position.

Fine-tuning reuses `run_loop` with its own batches; nothing here knows about tasks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from gptkit import distributed
from gptkit.checkpoint import TRAIN_STATE_NAME, ensure_intact, recover, save_model, write_json
from gptkit.config import GPTConfig, TrainConfig
from gptkit.errors import GptkitError
from gptkit.evaluate import lm_loss
from gptkit.model import GPT
from gptkit.optim import apply_schedule, make_optimizer
from gptkit.plot import LivePlot
from gptkit.runlog import EXTRA_MODULES, RunLog, Sink, TensorBoardSink, WandbSink, require_extra
from gptkit.runtime import autocast, pick_device, pick_dtype
from gptkit.sft import batch_on

TRAIN_CONFIG_NAME = "train_config.json"
SPIKE_FACTOR = 2.0  # a logged loss this many times the recent minimum is reported as a spike


class Batches(Protocol):
    """A resumable stream of (inputs, targets) batches; targets use IGNORE_INDEX to mask.
    A third element, if any, holds more keyword arguments of the model's forward (packed
    rows' `position_ids` and `attn_mask`, see `gptkit.sft`)."""

    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CompileFallback:
    """`torch.compile(model)` that falls back to eager, with a warning, if compiling fails.

    Compilation happens lazily at the first call, so the guard must sit around calls,
    not around `torch.compile` itself. Only compiler errors are caught.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.eager = model
        self.compiled: Callable[..., torch.Tensor] | None = torch.compile(model)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:
                if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                    raise
                warnings.warn(f"torch.compile failed ({type(exc).__name__}); continuing without it.",
                              stacklevel=2)
                self.compiled = None
        return self.eager(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.eager.train(mode)

    def eval(self) -> None:
        self.eager.eval()

    @property
    def training(self) -> bool:
        return self.eager.training


class StopRequest:
    """Turns Ctrl-C and SIGTERM into 'save and stop at the end of this step'."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True
        print("\nStopping: saving a checkpoint at the end of this step "
              "(Ctrl-C again to abort without saving).", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """--resume needs a checkpoint in `run_dir`; a fresh run must not overwrite one."""
    if run_dir.is_dir():
        recover(run_dir)  # a commit a crash interrupted decides whether a checkpoint exists
    has_run = (run_dir / TRAIN_STATE_NAME).exists()
    if resume and not has_run:
        raise GptkitError(f"--resume: {run_dir} holds no checkpoint ({TRAIN_STATE_NAME}); "
                          "start without --resume or point --out at an earlier run.")
    if has_run and not resume:
        raise GptkitError(f"{run_dir} already holds a training run; pass --resume to continue it "
                          "or choose another --out.")


def load_train_state(run_dir: Path) -> dict[str, Any]:
    """The resumable state of a run; refuses anything but plain tensors and containers."""
    ensure_intact(run_dir)
    check_run_dir(run_dir, resume=True)
    path = run_dir / TRAIN_STATE_NAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler refuses code objects with many error types
        raise GptkitError(f"{path} is not a loadable training state ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}).") from None


@dataclass
class LoopResult:
    step: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    stopped_early: bool
    seconds: float
    losses: list[float]


def run_loop(
    model: GPT,
    cfg: TrainConfig,
    train_batches: Batches,
    eval_batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None,
    run_dir: Path,
    *,
    save_extra: dict[str, Callable[[Path], None]] | None = None,
    prepare_model: Callable[[GPT], GPT] | None = None,
    progress: bool = True,
    info: distributed.DistInfo = distributed.SINGLE,
    benchmark: Callable[[GPT], dict[str, float]] | None = None,
) -> LoopResult:
    """Train `model` in place, checkpointing into `run_dir`; resumes when `cfg.resume`.

    `prepare_model` turns the model into what is saved (e.g. LoRA adapters merged);
    `save_extra` adds files (tokenizer, task template) to every checkpoint commit;
    `benchmark` scores the model at each evaluation (--eval-benchmark, rank 0). Under
    torchrun (`info`) only rank 0 logs and writes files.
    """
    from tqdm.auto import tqdm

    device = distributed.device_for(info, pick_device(cfg.device))
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.fsdp and prepare_model is not None:
        raise GptkitError("--fsdp cannot be combined with LoRA adapters; train LoRA without --fsdp.")
    main = info.is_main
    progress = progress and main
    model.to(device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    step, tokens = 0, 0
    torch.manual_seed(cfg.seed + info.rank)  # ranks draw different dropout masks
    state = load_train_state(run_dir) if cfg.resume else None
    if state is not None:
        check_same_optimizer(cfg, state, run_dir)
        adjust_accumulation(cfg, state, info, progress)
    wrapped = distributed.wrap(model, info, device, cfg.fsdp, dtype)
    optimizer = make_optimizer(model, cfg, device)  # after sharding: it holds the shards
    if state is not None:
        distributed.load_optimizer_state(model, optimizer.parts, state["optimizer"])
        train_batches.load_state_dict(state["data"])
        if state.get("world_size", 1) == info.world_size == 1:
            set_rng_state(state["rng"])
        else:  # dropout streams cannot carry over between world sizes; reseed reproducibly
            torch.manual_seed(cfg.seed + 1_000_003 * info.rank + int(state["step"]))
        step, tokens = int(state["step"]), int(state["tokens"])
    if device.type == "cuda":  # prepare batches while the GPU computes
        from gptkit.data import Prefetcher

        train_batches = Prefetcher(train_batches)
    forward: Callable[..., torch.Tensor] = CompileFallback(wrapped) if cfg.compile else wrapped
    metrics = RunLog(run_dir, step if cfg.resume else None, log_sinks(cfg, run_dir)) if main else None
    if main:
        write_json(run_dir / TRAIN_CONFIG_NAME, dataclasses.asdict(cfg))
        if info.enabled:
            print(f"distributed: {info.world_size} processes x batch {cfg.batch_size} x grad-accum "
                  f"{cfg.grad_accum} = global batch {cfg.batch_size * cfg.grad_accum * info.world_size}"
                  f"{' (FSDP)' if cfg.fsdp else ' (DDP)'}", file=sys.stderr)

    def log(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(record)

    def save(reason: str) -> None:
        # gathering sharded state is a collective: every rank takes part, rank 0 writes
        weights = distributed.full_model_state(model, cfg.fsdp) if cfg.fsdp else None
        optim_state = distributed.full_optimizer_state(model, optimizer.parts, cfg.fsdp)
        if main:
            to_save = prepare_model(model) if prepare_model else model
            train_state = {"step": step, "tokens": tokens, "optimizer": optim_state,
                           "data": train_batches.state_dict(), "rng": rng_state(),
                           "world_size": info.world_size, "grad_accum": cfg.grad_accum,
                           "config": json.dumps(dataclasses.asdict(cfg))}
            extra = dict(save_extra or {})
            extra[TRAIN_STATE_NAME] = lambda p: torch.save(train_state, p)
            try:
                save_model(to_save, run_dir, extra=extra, state_dict=weights)
            except OSError as exc:
                raise GptkitError(f"Could not write a checkpoint to {run_dir} ({exc.strerror or exc}); "
                                  "the previous checkpoint there is intact.") from None
            if progress:
                tqdm.write(f"saved checkpoint at step {step} ({reason}) to {run_dir}", file=sys.stderr)
        distributed.barrier(info)

    def run_eval() -> float | None:
        if eval_batches is None:
            return None
        val_loss, _ = lm_loss(forward, eval_batches(), device, dtype, info)
        scores = benchmark(model) if benchmark is not None and main else {}
        log({"step": step, "tokens": tokens, "val_loss": val_loss,
             "val_perplexity": math.exp(min(val_loss, 50.0)), **scores})
        return val_loss

    val_loss = None
    losses: list[float] = []
    start = time.perf_counter()
    stopped_early = False
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress, unit="step",
               dynamic_ncols=True)
    model.train()
    bad_streak = torch.zeros((), dtype=torch.long, device=device)
    with StopRequest() as stop:
        if step == 0 and cfg.eval_interval and eval_batches is not None:
            val_loss = run_eval()
            bar.write(f"step 0: val loss {val_loss:.4f}")
        window_start, window_tokens = time.perf_counter(), 0
        while step < cfg.max_steps:
            lr = apply_schedule(optimizer, step, cfg)
            loss_sum = torch.zeros((), device=device)
            step_tokens = 0
            for micro in range(cfg.grad_accum):
                x, y, extra = batch_on(train_batches.next_batch(), device, non_blocking=True)
                with distributed.no_sync(wrapped, sync=micro == cfg.grad_accum - 1):
                    with autocast(device, dtype):
                        loss = forward(x, targets=y, **extra) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
                step_tokens += x.numel() * info.world_size
            # the norm is needed anyway to clip; inf max_norm measures without clipping
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            bad = non_finite(loss_sum, norm)
            optimizer.step(skip=bad)
            optimizer.zero_grad(set_to_none=True)
            bad_streak = (bad_streak + 1) * bad
            if device.type == "cpu" or step % cfg.log_interval == 0:  # free on CPU, rare on GPUs
                check_bad_steps(bad_streak, bad, step, cfg, log)
            step += 1
            tokens += step_tokens
            window_tokens += step_tokens
            bar.update(1)
            last = step == cfg.max_steps
            if step % cfg.log_interval == 0 or last:
                loss_value = distributed.mean(loss_sum, info).item()  # the one host sync
                if losses and math.isfinite(loss_value) and loss_value > SPIKE_FACTOR * min(losses[-10:]):
                    log({"step": step, "event": "loss_spike", "loss": loss_value,
                         "recent_min": min(losses[-10:])})
                losses.append(loss_value)
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / max(elapsed, 1e-9)
                log({"step": step, "tokens": tokens, "loss": loss_value, "lr": lr,
                     "tokens_per_s": tokens_per_s,  # and a mixture's tokens per source
                     **train_batches.state_dict().get("tokens_by_source", {})})
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            if cfg.eval_interval and (step % cfg.eval_interval == 0 or last):
                val_loss = run_eval()
                if val_loss is not None:
                    bar.write(f"step {step}: val loss {val_loss:.4f}")
            out_of_time = cfg.max_time is not None and time.perf_counter() - start > cfg.max_time
            if should_stop(stop.requested or out_of_time, info):
                stopped_early = True
                save("interrupted" if stop.requested else "time limit")
                break
            if last or (cfg.save_interval and step % cfg.save_interval == 0):
                save("end" if last else "interval")
    bar.close()
    if metrics is not None:
        metrics.close()
    if hasattr(train_batches, "close"):
        train_batches.close()
    return LoopResult(step=step, tokens=tokens, train_loss=losses[-1] if losses else None,
                      val_loss=val_loss, stopped_early=stopped_early,
                      seconds=time.perf_counter() - start, losses=losses)


def log_sinks(cfg: TrainConfig, run_dir: Path) -> list[Sink]:
    """Where the run's numbers go besides metrics.jsonl: the live loss plot, and the
    integrations the user asked for (each refuses in one sentence when its package is missing)."""
    sinks: list[Sink] = []
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    if cfg.wandb:
        sinks.append(WandbSink(run_dir, dataclasses.asdict(cfg)))
    return [*sinks, LivePlot(run_dir)]


def non_finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor, True when the loss or a gradient is NaN or infinite."""
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    return ~(torch.isfinite(loss) & torch.isfinite(grad_norm))


def check_bad_steps(streak: torch.Tensor, bad: torch.Tensor, step: int, cfg: TrainConfig,
                    log: Callable[[dict[str, Any]], None]) -> None:
    """Log a skipped step; stop after `max_bad_steps` of them in a row."""
    if bool(bad):
        log({"step": step + 1, "event": "non_finite_step_skipped"})
        print(f"step {step + 1}: loss or gradient is not finite; step skipped", file=sys.stderr)
    if int(streak) >= cfg.max_bad_steps:
        raise GptkitError(f"Training stopped: {int(streak)} consecutive steps had a NaN or infinite "
                          f"loss or gradient (lower --lr or check the data); the last good checkpoint "
                          f"in {cfg.out} is kept.")


def check_same_optimizer(cfg: TrainConfig, state: dict[str, Any], run_dir: Path) -> None:
    """A run resumes with the optimizer it was started with (its saved state is that one's)."""
    saved = json.loads(state.get("config", "{}")).get("optimizer", "adamw")
    if saved != cfg.optimizer:
        raise GptkitError(f"{run_dir} was trained with --optimizer {saved}; resume it with "
                          f"--optimizer {saved} (its saved optimizer state is {saved}'s), or start "
                          f"a new run with --optimizer {cfg.optimizer} in another --out.")


def should_stop(local: bool, info: distributed.DistInfo) -> bool:
    """Stop together: one rank's Ctrl-C or time limit stops all of them at the same step."""
    if not info.enabled:
        return local
    return bool(distributed.total(torch.tensor(float(local)), info).item() > 0)


def adjust_accumulation(cfg: TrainConfig, state: dict[str, Any], info: distributed.DistInfo,
                        progress: bool) -> None:
    """Keep the global batch when resuming with another number of processes."""
    saved_world = int(state.get("world_size", 1))
    if saved_world == info.world_size:
        return
    global_micro = saved_world * int(state.get("grad_accum", cfg.grad_accum))
    if global_micro % info.world_size:
        raise GptkitError(f"The checkpoint was written by {saved_world} processes with grad-accum "
                          f"{state.get('grad_accum')}; {info.world_size} processes cannot keep that "
                          "global batch. Use a world size that divides it.")
    cfg.grad_accum = global_micro // info.world_size
    if progress:
        print(f"resuming a {saved_world}-process run on {info.world_size}: grad-accum set to "
              f"{cfg.grad_accum} to keep the global batch.", file=sys.stderr)


# -- pretraining ------------------------------------------------------------------------

def build_model(cfg: TrainConfig, vocab_size: int, eos_token_id: int) -> GPT:
    """A fresh model from the preset, `--arch` and the shape flags, or the weights of `--init-from`."""
    shape = ("arch", "n_kv_head", "tie_word_embeddings", "n_layer", "n_head", "n_embd",
             "block_size", "dropout")
    overrides = {name: getattr(cfg, name) for name in shape if getattr(cfg, name) is not None}
    if cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from)
        if overrides.get("arch") == model.config.arch:
            del overrides["arch"]
        if vocab_size > model.config.vocab_size:
            raise GptkitError(f"The tokenizer's vocabulary ({vocab_size}) does not fit the model in "
                              f"{cfg.init_from} (vocab_size {model.config.vocab_size}).")
        block = overrides.pop("block_size", None)
        if block is not None and block > model.config.block_size:
            raise GptkitError(f"--block-size {block} is larger than the context of {cfg.init_from} "
                              f"({model.config.block_size}).")
        if "dropout" in overrides:
            model.config.dropout = overrides.pop("dropout")
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = model.config.dropout
                elif hasattr(module, "dropout") and isinstance(module.dropout, float):
                    module.dropout = model.config.dropout
        if overrides:
            flags = ", ".join("--" + k.replace("_", "-") for k in overrides)
            raise GptkitError(f"Training from {cfg.init_from} keeps its shape; remove {flags}.")
        return model
    torch.manual_seed(cfg.seed)
    config = GPTConfig.from_preset(cfg.preset, vocab_size=vocab_size, eos_token_id=eos_token_id,
                                   bos_token_id=eos_token_id, **overrides)
    return GPT(config)


def train(cfg: TrainConfig, progress: bool = True) -> LoopResult:
    """`gptkit train`: pretrain on a prepared data directory, writing a run directory."""
    check_extras(cfg)
    return distributed.launch(_pretrain, cfg, progress)


def check_extras(cfg: TrainConfig) -> None:
    """Refuse a logger whose optional package is missing (--tensorboard, --wandb) before
    the run prints anything or creates its directory."""
    for name in EXTRA_MODULES:
        if getattr(cfg, name):
            require_extra(name)


def _pretrain(cfg: TrainConfig, info: distributed.DistInfo, progress: bool) -> LoopResult:
    from gptkit.data import TokenBatches, iter_eval_batches, load_meta, load_tokens
    from gptkit.mixture import MixtureBatches, check_sources, is_mixture, parse_mixture
    from gptkit.tokenizer import Tokenizer

    # a mixture evaluates on its first source's validation split
    sources = parse_mixture(cfg.data) if is_mixture(cfg.data) else None
    data_dir = sources[0].directory if sources else Path(cfg.data)
    meta = check_sources(sources) if sources else load_meta(data_dir)
    run_dir = Path(cfg.out)
    tokenizer = Tokenizer.from_pretrained(data_dir / "tokenizer")
    check_run_dir(run_dir, cfg.resume)
    scorer = None
    if cfg.eval_benchmark:  # its names checked before anything is written
        from gptkit.benchmark import training_scorer

        scorer = training_scorer(cfg.eval_benchmark, cfg.eval_benchmark_limit, tokenizer)
    if cfg.resume:
        model = GPT.from_pretrained(run_dir)
    else:
        model = build_model(cfg, meta["vocab_size"], meta["eos_token_id"])
    check_tokenizer(cfg.init_from or (run_dir if cfg.resume else None), meta)
    block_size = cfg.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise GptkitError(f"--block-size {block_size} is larger than the model's context ({model.config.block_size}).")
    device = distributed.device_for(info, pick_device(cfg.device))
    val_tokens = load_tokens(data_dir, "val")
    batches: TokenBatches | MixtureBatches
    if sources:
        batches = MixtureBatches(sources, block_size, cfg.batch_size, cfg.seed, rank=info.rank,
                                 world_size=info.world_size, device=str(device))
    else:
        batches = TokenBatches(load_tokens(data_dir, "train"), block_size, cfg.batch_size,
                               cfg.seed, rank=info.rank, world_size=info.world_size,
                               device=str(device))
    eval_batches = None
    if len(val_tokens) > block_size:
        def eval_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return iter_eval_batches(val_tokens, block_size, cfg.batch_size, cfg.eval_steps)
    elif progress:
        print(f"note: {data_dir} has too little validation data for block size {block_size}; "
              "skipping evaluation.", file=sys.stderr)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier(info)
    if progress:
        n = model.num_params()
        print(f"model: {model.config.n_layer} layers, {model.config.n_head} heads, "
              f"{model.config.n_embd} wide, context {model.config.block_size}, {n / 1e6:.2f}M parameters; "
              f"{cfg.batch_size * cfg.grad_accum * block_size:,} tokens per step", file=sys.stderr)
    return run_loop(model, cfg, batches, eval_batches, run_dir,
                    save_extra=tokenizer_files(tokenizer), progress=progress, info=info,
                    benchmark=scorer)


def check_tokenizer(model_dir: str | Path | None, meta: dict[str, Any]) -> None:
    """Refuse data tokenized differently from the model we continue training."""
    if model_dir is None:
        return
    from gptkit.tokenizer import Tokenizer

    path = Path(model_dir)
    if not (path / "tokenizer.json").exists() and not (path / "vocab.json").exists():
        return  # a bare model directory: the vocabulary size check is all we can do
    model_hash = Tokenizer.from_pretrained(path).hash
    if model_hash != meta["tokenizer_hash"]:
        raise GptkitError(f"The data was tokenized with a different tokenizer than the model in {path} "
                          "(tokenizer hashes differ); run `gptkit prepare` with that model's tokenizer.")


def tokenizer_files(tokenizer: Any) -> dict[str, Callable[[Path], None]]:
    """Writers for every file of `tokenizer`, so a checkpoint commit carries it whole."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        contents = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    return {name: (lambda p, data=data: Path(p).write_bytes(data)) for name, data in contents.items()}
