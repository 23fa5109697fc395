"""Continuous batching: concurrent requests share every forward pass of one model.

The engine owns a fixed pool of `max_batch_size` rows over one static KV cache (row r of
the cache belongs to whichever request sits in row r). A scheduler thread repeats:

1. drop cancelled requests and admit queued ones into free rows (lowest row first, so
   the batch stays a short prefix of the pool);
2. prefill joining prompts in chunks of at most `prefill_chunk` tokens per step, so a
   long prompt never stalls the rows that are already decoding; a prompt's last token
   is left for step 3, whose batched LM head gives its logits (a prefill of its own
   would read the whole head, the largest weight of a small model, for one row);
3. run ONE decode step for all decoding rows, each at its own cache position
   (per-row `input_pos`, position ids and masks), and sample each row with its own
   request's settings and seeded generator;
4. stream text to each request's `sink` and free the row at eos, a stop string, the
   length limit or a cancel; the next queued request joins at the next step.

The model runs only in that thread, so an asyncio server calling `submit` never blocks
on model work. It is a `ModelThread`, where a server also loads the model: PyTorch's
OpenMP runtime keeps a team of worker threads for every thread that runs parallel
tensor work, and two teams on the same cores (a model loaded in one thread and decoded
in another) make every team yield its cores between operations, which slows decoding
by up to half (docs/performance.md, Serving). Rows decode exactly as they would alone
(masks hide other requests and stale cache slots), so greedy output equals
`gptkit.generate.generate`.

    thread = ModelThread()
    model, tokenizer = thread.submit(load_for_inference, "runs/mine", fast=True).result()
    engine = Engine(model, tokenizer, max_batch_size=8, thread=thread)
    engine.start()
    engine.submit([GenerationRequest(tokenizer.encode("Hello"), 20, sink=print)])
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from gptkit.generate import (
    Sampling,
    TextCodec,
    TextStream,
    decode_step,
    sample_next,
    usable_logits,
)
from gptkit.model import KVCache

if TYPE_CHECKING:
    from gptkit.model import GPT

log = logging.getLogger(__name__)

# Attention reads the cache in blocks of this many slots: enough to cover every row's
# position, few enough distinct shapes that views and compiled steps are reused.
SLOT_BLOCK = 64
# Finish reasons, as OpenAI names them.
STOP, LENGTH = "stop", "length"
T = TypeVar("T")


class ModelThread:
    """The one thread that should run all of a served model's tensor work: load the model
    through it (`thread.submit(load, ...).result()`), then give it to the `Engine`, whose
    scheduler runs there too. Callables run in the order given; it is a daemon thread, so
    an engine never closed does not keep the interpreter from exiting."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="gptkit-engine", daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def stop(self) -> None:
        """End the thread once the callables already given have run."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # the caller's to handle, through the future
                future.set_exception(exc)


class QueueFull(Exception):
    """The waiting queue cannot take these requests now; the caller should retry later."""


@dataclass
class TokenLogprob:
    """One token's text, log-probability and the most likely alternatives (text -> logprob)."""

    token: str
    logprob: float | None
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class Event:
    """What one scheduler step produced for a request.

    `text` is new printable text (possibly empty while a character or a possible stop
    string is incomplete). The last event has `finish_reason` ("stop", "length") or
    `error` (with its HTTP `status`), and `completion_tokens`, the number of tokens generated.
    """

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0
    status: int = 500  # with `error`: 500 when generating failed, 503 when shutting down


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate; fields are validated by the caller (the server).

    `temperature` 0 is greedy. `logprobs` asks for the chosen tokens' log-probabilities
    and that many alternatives (None: none); `echo_logprobs` adds the prompt's tokens.
    Penalties follow OpenAI: a token's logit drops by `frequency_penalty` per earlier
    occurrence in the output and by `presence_penalty` once it has occurred.
    `top_k` and `repetition_penalty` are `gptkit generate`'s (the penalty counts the prompt
    too, as transformers does); `min_p` keeps the tokens at least that fraction as likely
    as the most likely one (after temperature), as llama.cpp and vLLM do.
    """

    prompt: list[int]
    max_new_tokens: int
    sink: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None
    echo_logprobs: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        """Drop the request (the client left); its row is freed before the next step."""
        self.cancelled = True


class _Row:
    """A request's place in the batch: its progress through the prompt and the output."""

    def __init__(self, request: GenerationRequest, device: torch.device, vocab_size: int,
                 tokenizer: TextCodec) -> None:
        self.request = request
        self.filled = 0  # prompt tokens already in the cache
        # Echo scores every prompt token, so its prefill runs the head over all of them;
        # otherwise the last prompt token enters with the first decode step.
        self.prefill_len = len(request.prompt) - (not request.echo_logprobs)
        self.pos = len(request.prompt) - 1  # cache slot (= position) of the newest token
        self.last = request.prompt[-1]  # newest token, fed to the next decode step
        self.count = 0  # tokens sampled, eos included
        self.text = TextStream(tokenizer, request.stop)  # output text, released as it is ready
        generator = torch.Generator(device=device)
        if request.seed is None:
            generator.seed()  # a fresh unseeded Generator would always start from one seed
        else:
            generator.manual_seed(request.seed)
        greedy = request.temperature == 0
        self.sampling = Sampling(do_sample=not greedy, temperature=request.temperature,
                                 top_p=request.top_p, top_k=request.top_k,
                                 repetition_penalty=request.repetition_penalty,
                                 generator=generator)
        penalized = request.presence_penalty or request.frequency_penalty
        self.counts = torch.zeros(vocab_size, device=device) if penalized else None
        self.seen = None  # (1, V) bool: the tokens the repetition penalty applies to
        if request.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(request.prompt, device=device)] = True
        self.plain_greedy = greedy and self.counts is None and self.seen is None

    @property
    def decoding(self) -> bool:
        return self.filled == self.prefill_len


class Engine:
    """A continuous-batching generation engine for one model (see the module docstring)."""

    def __init__(self, model: GPT, tokenizer: TextCodec, *, max_batch_size: int = 8,
                 max_queue: int = 64, prefill_chunk: int = 256,
                 eos_token_id: int | Sequence[int] | None = None,
                 thread: ModelThread | None = None) -> None:
        if max_batch_size < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1, max_queue >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.context = model.config.block_size
        eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
        # several ids end a sequence where a chat model has an end-of-turn token as well
        self.eos = set(eos) if isinstance(eos, Sequence) else ({eos} if eos is not None else set())
        self.device = model.device
        self._rows: list[_Row | None] = [None] * max_batch_size
        self._queue: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = thread or ModelThread()  # runs the scheduler and the model's setup
        self._running: Future[None] | None = None
        self.fatal: BaseException | None = None  # what stopped the scheduler, if anything did
        self.on_fatal: Callable[[], None] | None = None  # told when the scheduler stops for good
        self.completed = 0
        self.cancelled = 0
        self.decode_steps = 0
        self._views: dict[tuple[int, int, int], list[KVCache]] = {}
        self._thread.submit(self._allocate).result()

    def _allocate(self) -> None:
        """The cache pool and the attention tables, made in the model's thread."""
        with torch.inference_mode():
            # uninitialized: rows are zeroed as far as attention reads them (`_clear`)
            self.model.setup_cache(self.max_batch_size, self.context, zeroed=False)
            self._cleared = [0] * self.max_batch_size  # slots zeroed so far, per row
            # causal[i] = which cache slots a token at slot i may attend to
            self._causal = torch.ones(self.context, self.context, dtype=torch.bool,
                                      device=self.device).tril()
            self._slots = torch.arange(self.context, device=self.device)
        self._full_caches = self.model.kv_caches

    # -- the public, thread-safe side ------------------------------------------------

    def start(self) -> None:
        """Start the scheduler (in the model's thread)."""
        if self._running is None:
            self._running = self._thread.submit(self._loop)

    def close(self) -> None:
        """Stop the scheduler; requests still queued or running end with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._running is not None:
            self._running.result()
            self._running = None
        self._thread.stop()
        for request in [*self._queue, *(row.request for row in self._rows if row)]:
            _send(request, Event(error="the server is shutting down", status=503))
        self._queue.clear()
        self._rows = [None] * self.max_batch_size

    def submit(self, requests: Sequence[GenerationRequest]) -> None:
        """Queue requests together (all or none); raise `QueueFull` when they do not fit."""
        with self._cond:
            if self._stopping or self.fatal is not None:
                raise QueueFull("the engine is shutting down")
            if len(self._queue) + len(requests) > self.max_queue + self._free_rows():
                raise QueueFull(f"{len(self._queue)} requests are already waiting")
            self._queue.extend(requests)
            self._cond.notify()

    @property
    def alive(self) -> bool:
        """Whether the scheduler is running and can take requests."""
        return self._running is not None and not self._running.done() and self.fatal is None

    def stats(self) -> dict[str, int]:
        """Rows in use, requests waiting, requests completed or cancelled, decode steps run."""
        with self._cond:
            return {"active": sum(row is not None for row in self._rows),
                    "queued": len(self._queue), "max_batch_size": self.max_batch_size,
                    "completed": self.completed, "cancelled": self.cancelled,
                    "decode_steps": self.decode_steps}

    def _free_rows(self) -> int:
        # Requests that a free row will take at the next step are not really waiting.
        return sum(row is None for row in self._rows)

    # -- the scheduler thread --------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._queue and not any(self._rows):
                        self._cond.wait()
                    if self._stopping:
                        return
                    self._admit()
                with torch.inference_mode():
                    self._step()
        except BaseException as exc:  # the scheduler itself broke: nothing more can be served
            log.exception("the generation engine stopped")
            self.fatal = exc
            for index, row in enumerate(self._rows):
                if row is not None:
                    self._fail(index, exc)
            for request in self._queue:
                _send(request, Event(error=f"the generation engine stopped: {exc}"))
            self._queue.clear()
            if self.on_fatal is not None:
                self.on_fatal()

    def _fail(self, index: int, exc: BaseException) -> None:
        """End one row's request with an error; the other rows go on."""
        row = self._rows[index]
        if row is None:  # it had already finished
            return
        log.error("request in row %d failed: %s", index, exc, exc_info=exc)
        self._finish(index, Event(error=f"generation failed: {type(exc).__name__}: {exc}",
                                  completion_tokens=row.count))

    def _admit(self) -> None:
        """Free the rows of cancelled requests and move queued requests into free rows."""
        for index, row in enumerate(self._rows):
            if row is not None and row.request.cancelled:
                self._rows[index] = None
                self.cancelled += 1
        while self._queue and None in self._rows:
            request = self._queue.popleft()
            if request.cancelled:
                self.cancelled += 1
                continue
            self._rows[self._rows.index(None)] = _Row(request, self.device,
                                                      self.model.config.vocab_size, self.tokenizer)

    def _step(self) -> None:
        budget, chunks = self.prefill_chunk, []  # chunks: (row index, first slot, stop slot)
        for index, row in enumerate(self._rows):
            if row is not None and not row.decoding and budget > 0:
                start = row.filled
                # Echo with logprobs scores every prompt token, so that prompt goes in one piece.
                stop = (row.prefill_len if row.request.echo_logprobs
                        else min(row.prefill_len, start + budget))
                chunks.append((index, start, stop))
                budget -= stop - start
        plain = []
        for chunk in chunks:
            if self._rows[chunk[0]].request.echo_logprobs:
                self._isolated(self._prefill_echo, chunk)
            else:
                plain.append(chunk)
        if len(plain) > 1:
            try:
                self._prefill(plain)
                plain = []
            except Exception:  # one of them may be at fault: each again alone, below
                pass
        for chunk in plain:
            self._isolated(lambda c: self._prefill([c]), chunk)
        live = [i for i, row in enumerate(self._rows) if row is not None and row.decoding]
        if live:
            self._decode(live[-1] + 1)

    def _isolated(self, prefill: Callable[[tuple[int, int, int]], None],
                  chunk: tuple[int, int, int]) -> None:
        """A prompt that fails to prefill (a bug, out of memory) fails its request alone."""
        try:
            prefill(chunk)
        except Exception as exc:
            self._fail(chunk[0], exc)

    def _span(self, needed: int) -> int:
        """`needed` cache slots rounded up to a multiple of SLOT_BLOCK."""
        return min(self.context, -(-needed // SLOT_BLOCK) * SLOT_BLOCK)

    def _clear(self, rows: Sequence[int], slots: int) -> None:
        """Zero the first `slots` slots of these rows where no step has read them yet.

        Attention gives masked slots zero weight, but zero times NaN is NaN, so the pool's
        uninitialized memory must hold numbers before any step reads it. Later requests in
        a row read the finite keys and values of earlier ones, masked."""
        for row in rows:
            if self._cleared[row] < slots:
                for full in self._full_caches:
                    full.k[row, :, self._cleared[row]:slots].zero_()
                    full.v[row, :, self._cleared[row]:slots].zero_()
                self._cleared[row] = slots

    def _use_rows(self, start: int, stop: int, needed: int) -> int:
        """Point every layer at rows start..stop-1 of the cache, over the first `needed`
        slots rounded up to a multiple of SLOT_BLOCK (views share the cache's memory), so
        attention reads only slots some row has reached; returns that number of slots."""
        slots = self._span(needed)
        self._clear(range(start, stop), slots)
        views = self._views.get((start, stop, slots))
        if views is None:
            views = [full.rows(start, stop, slots) for full in self._full_caches]
            self._views[(start, stop, slots)] = views
        self.model.kv_caches = views
        return slots

    def _prefill(self, chunks: list[tuple[int, int, int]]) -> None:
        """Put the next chunk of each joining prompt into its row, all in one forward pass
        that writes keys and values only (a prompt's last token gets its logits in the
        decode step).

        Several rows need not be adjacent in the cache, so they are copied out of it and
        back. Chunks shorter than the longest are padded with token 0 at slots past their
        own end, which later tokens overwrite before anything attends to them.
        """
        width = max(stop - start for _, start, stop in chunks)
        span = self._span(max(start for _, start, _ in chunks) + width)  # padding included
        ids = [self._rows[index].request.prompt[start:stop] + [0] * (width - stop + start)
               for index, start, stop in chunks]
        # the last slot stays free for padding: a plain prompt's chunk ends before it
        slots = torch.tensor([[min(start + j, self.context - 1) for j in range(width)]
                              for _, start, _ in chunks], device=self.device)
        rows = [index for index, *_ in chunks]
        if len(rows) == 1:
            self._use_rows(rows[0], rows[0] + 1, span)
        else:
            picked = torch.tensor(rows, device=self.device)
            self._clear(rows, span)
            self.model.kv_caches = [full.gather(picked, span) for full in self._full_caches]
        self.model.hidden_states(torch.tensor(ids, device=self.device), position_ids=slots,
                                 input_pos=slots, attn_mask=self._causal[slots, :span][:, None])
        if len(rows) > 1:
            for full, part in zip(self._full_caches, self.model.kv_caches, strict=True):
                full.scatter(picked, part)
        for index, _, stop in chunks:
            self._rows[index].filled = stop

    def _prefill_echo(self, chunk: tuple[int, int, int]) -> None:
        """Prefill a whole prompt whose every token is scored (echo with logprobs), then
        sample its first new token from the last position's logits."""
        index, start, stop = chunk
        row = self._rows[index]
        span = self._use_rows(index, index + 1, stop)
        slots = self._slots[start:stop]
        logits = usable_logits(self.model, self.model(
            torch.tensor([row.request.prompt[start:stop]], device=self.device),
            position_ids=slots[None], input_pos=slots,
            attn_mask=self._causal[start:stop, :span][None, None])[0])  # (T, V)
        row.filled = row.pos = stop
        self._send_prompt_logprobs(row, logits)
        self._take(index, row, logits[-1], None)

    def _decode(self, rows: int) -> None:
        """One token for every decoding row among the first `rows`, in one forward pass.

        Rows in that range that are free or still prefilling ride along writing token 0
        into a slot their own prefill overwrites later, so the batch keeps one shape.
        """
        tokens, pos = [], []
        for row in self._rows[:rows]:
            live = row is not None and row.decoding
            tokens.append(row.last if live else 0)
            pos.append(row.pos if live else (row.filled if row else 0))
        tokens_t = torch.tensor(tokens, device=self.device)[:, None]
        pos_t = torch.tensor(pos, device=self.device)[:, None]
        span = self._use_rows(0, rows, max(pos) + 1)
        try:
            logits = decode_step(self.model, tokens_t, pos_t, pos_t,
                                 self._causal[pos_t, :span][:, None])
        except Exception as exc:  # the shared forward failed: every row in it fails, alone
            for index, row in enumerate(self._rows[:rows]):
                if row is not None and row.decoding:
                    self._fail(index, exc)
            return
        self.decode_steps += 1
        greedy = logits.argmax(-1).tolist()
        for index, row in enumerate(self._rows[:rows]):
            if row is not None and row.decoding and not row.request.cancelled:
                row.pos += 1
                try:
                    self._take(index, row, logits[index], greedy[index])
                except Exception as exc:  # sampling or text of this row failed: it alone
                    self._fail(index, exc)

    def _take(self, index: int, row: _Row, logits: torch.Tensor, greedy: int | None) -> None:
        """Sample the row's next token from its logits (V,), then send the text it adds."""
        request = row.request
        if row.plain_greedy and greedy is not None:
            token = greedy
        else:
            if row.counts is not None:
                logits = (logits.float() - row.counts * request.frequency_penalty
                          - (row.counts > 0).float() * request.presence_penalty)
            kept = logits  # logprobs stay those of the whole distribution
            if request.min_p and row.sampling.do_sample:
                probs = (logits.float() / request.temperature).softmax(-1)
                kept = logits.masked_fill(probs < request.min_p * probs.max(), float("-inf"))
            token = int(sample_next(kept[None], row.sampling, row.seen)[0])
        row.last, row.count = token, row.count + 1
        if row.counts is not None:
            row.counts[token] += 1
        if row.seen is not None:
            row.seen[0, token] = True
        if token in self.eos:
            self._finish(index, Event(finish_reason=STOP, completion_tokens=row.count))
            return
        event = Event(logprobs=self._logprobs(logits, [token], request.logprobs))
        event.text, stopped = row.text.push(token)
        if stopped:
            event.finish_reason = STOP
        elif row.count >= request.max_new_tokens or row.pos + 1 >= self.context:
            event.text, event.finish_reason = event.text + row.text.rest(), LENGTH
        if event.finish_reason is not None:
            event.completion_tokens = row.count
            self._finish(index, event)
        else:
            _send(request, event)

    def _finish(self, index: int, event: Event) -> None:
        request = self._rows[index].request
        self._rows[index] = None
        self.completed += 1
        _send(request, event)

    def _logprobs(self, logits: torch.Tensor, tokens: list[int], top: int | None
                  ) -> list[TokenLogprob]:
        """Log-probabilities of `tokens` under logits (len(tokens), V) or (V,)."""
        if top is None or not tokens:
            return []
        logp = logits.float().reshape(len(tokens), -1).log_softmax(-1)
        out = []
        for dist, token in zip(logp, tokens, strict=True):
            alternatives = {}
            if top:
                values, ids = dist.topk(min(top, dist.numel()))
                alternatives = {self.tokenizer.decode([i]): v
                                for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
            out.append(TokenLogprob(self.tokenizer.decode([token]), float(dist[token]),
                                    alternatives))
        return out

    def _send_prompt_logprobs(self, row: _Row, logits: torch.Tensor) -> None:
        """Echo: prompt token i is scored by the logits (T, V) at position i - 1."""
        prompt = row.request.prompt
        entries = [TokenLogprob(self.tokenizer.decode(prompt[:1]), None)]
        entries += self._logprobs(logits[:-1], prompt[1:], row.request.logprobs or 0)
        _send(row.request, Event(logprobs=entries))


def _send(request: GenerationRequest, event: Event) -> None:
    """Hand an event to the request's sink; a sink that fails (its client is gone) cancels."""
    try:
        request.sink(event)
    except Exception:
        request.cancel()
