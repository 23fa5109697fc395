"""The HTTP server: OpenAI-compatible completions and chat, SSE streaming, a web playground.

    gptkit serve --model runs/mine
    # then, from any OpenAI client:
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").completions.create(
        model="mine", prompt="Once upon a time", max_tokens=50)

`create_app` builds the FastAPI app (importing this module creates no app and loads no
model); `serve` runs it under uvicorn. All generation goes through one continuous-batching `Engine` in its own
thread, so the event loop only parses, validates and streams. Every request is checked
here against named `Limits` before it reaches the engine, and every error is OpenAI's
error JSON naming the offending field: hostile input gets a 4xx, never a 5xx. Harmless
fields other servers accept (`user`, `response_format` text, ...) are accepted too, and
`POST /v1/chat/fit` fits a conversation to the context as `gptkit chat` does.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import math
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from gptkit.conversation import ChatFormat, chat_format, fit_chat, stop_token_ids
from gptkit.errors import GptkitError, closest

if TYPE_CHECKING:
    from gptkit.serve.engine import Engine, Event, TokenLogprob
    from gptkit.tasks import TaskSpec
    from gptkit.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is refused with a 4xx before any work."""

    max_body_bytes: int = 1 << 20
    max_n: int = 16  # choices per prompt
    max_prompts: int = 32  # prompts in one completions request
    max_choices: int = 64  # prompts x n
    max_stop: int = 4  # stop strings (OpenAI's limit)
    max_stop_chars: int = 256
    max_messages: int = 256
    max_completion_logprobs: int = 5  # OpenAI's limits for the two endpoints
    max_chat_top_logprobs: int = 20
    retry_after_s: int = 1  # what a 429 tells the client to wait


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = ("invalid_request_error" if self.status < 500 else "server_error")
        if self.status == 401:
            kind = "authentication_error"
        elif self.status == 429:
            kind = "rate_limit_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


# -- request fields --------------------------------------------------------------------

# `user` (an end-user id for OpenAI's abuse monitoring) is checked and ignored; `top_k`,
# `repetition_penalty` and `min_p` are vLLM's and llama.cpp's extensions, honoured.
SAMPLING_FIELDS = ("model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                   "stream_options", "presence_penalty", "frequency_penalty", "user", "top_k",
                   "repetition_penalty", "min_p")
COMPLETION_FIELDS = (*SAMPLING_FIELDS, "prompt", "echo", "logprobs")
# `response_format` {"type": "text"} is what is answered anyway; `parallel_tool_calls` has
# no tools to apply to: both are accepted.
CHAT_FIELDS = (*SAMPLING_FIELDS, "messages", "logprobs", "top_logprobs", "max_completion_tokens",
               "response_format", "parallel_tool_calls")
# OpenAI fields a client may send that this server does not implement: a 400 says so.
UNSUPPORTED = ("best_of", "logit_bias", "suffix", "tools", "tool_choice", "functions",
               "function_call", "modalities", "audio", "prediction", "store", "metadata",
               "service_tier", "reasoning_effort")
ROLES = ("system", "developer", "user", "assistant")


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(name: str, expected: str, value: Any) -> ApiError:
    return ApiError(400, f"'{name}' must be {expected}; got {_show(value)}.", param=name)


def _check_fields(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for name in body:
        if name in allowed:
            continue
        if name in UNSUPPORTED:
            raise ApiError(400, f"'{name}' is not supported by this server.", param=name)
        raise ApiError(400, f"Unknown field '{name}'{closest(name, allowed)}; expected some of: "
                       f"{', '.join(allowed)}.", param=name)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not low <= value <= high):
        raise _bad(name, f"a number from {low:g} to {high:g}", value)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, low: int, high: int
             ) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(name, f"an integer from {low} to {high}", value)
    return value


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, "true or false", value)
    return value


@dataclass
class Settings:
    """The sampling fields shared by both endpoints, validated."""

    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    presence_penalty: float
    frequency_penalty: float
    top_k: int | None = None
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logprobs: int | None = None
    echo: bool = False
    extra_stop: list[str] = field(default_factory=list)


def _settings(body: dict[str, Any], limits: Limits, context: int) -> Settings:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if (not isinstance(stops, list) or len(stops) > limits.max_stop
            or not all(isinstance(s, str) and 0 < len(s) <= limits.max_stop_chars for s in stops)):
        raise _bad("stop", f"a string or a list of at most {limits.max_stop} non-empty strings "
                   f"of at most {limits.max_stop_chars} characters", stop)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed when 'stream' is true.",
                           param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options", 'an object like {"include_usage": true}', options)
    max_tokens = _integer(body, "max_tokens", None, 1, context - 1)
    if not isinstance(body.get("user", ""), str):
        raise _bad("user", "a string", body["user"])
    penalty = _number(body, "repetition_penalty", 1.0, 0, 10)
    if penalty == 0:
        raise _bad("repetition_penalty", "a number above 0 and at most 10", 0)
    top_k = _integer(body, "top_k", None, -1, 2**31 - 1)
    return Settings(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1),
        n=_integer(body, "n", 1, 1, limits.max_n),  # type: ignore[arg-type]
        stop=stops,
        seed=_integer(body, "seed", None, -(2**63), 2**64 - 1),
        stream=stream,
        include_usage=_boolean(options or {}, "include_usage"),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        top_k=top_k if top_k and top_k > 0 else None,  # 0 (llama.cpp) and -1 (vLLM): all
        repetition_penalty=penalty,
        min_p=_number(body, "min_p", 0.0, 0, 1),
    )


# -- chat template -----------------------------------------------------------------------

def _message_text(message: Any, index: int) -> tuple[str, str]:
    """(role, text) of one chat message; content may be a string or a list of text parts."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _bad(where, 'an object like {"role": "user", "content": "..."}', message)
    for key in message:
        if key not in ("role", "content", "name"):
            raise ApiError(400, f"Unknown field '{where}.{key}'; expected role, content and "
                           "name.", param=f"{where}.{key}")
    if not isinstance(message.get("name", ""), str):  # a participant's name: not rendered
        raise _bad(f"{where}.name", "a string", message["name"])
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise _bad(f"{where}.role", f"one of {', '.join(ROLES)}", role)
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            and set(p) == {"type", "text"} for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise _bad(f"{where}.content", 'a string or a list of {"type": "text", "text": ...} parts',
                   content)
    return role, content


def render_chat(messages: list[tuple[str, str]], spec: TaskSpec | None, fmt: ChatFormat
                ) -> tuple[str, list[str]]:
    """The prompt for a conversation, and stop strings that end the assistant's turn.

    A chat model renders it with its chat template (`gptkit.conversation`): the prompt
    transformers' `apply_chat_template(..., add_generation_prompt=True)` makes, its answer
    ended by the end-of-turn token. A model fine-tuned for a task formats each user turn
    with its task template (the text fills the task's main field) and each assistant turn
    as a target; a base model gets a plain "User: / Assistant:" transcript and stops
    before the next "User:". The last message must come from the user in every case.
    """
    if not messages or messages[-1][0] != "user":
        raise ApiError(400, "The last chat message must come from the user (an answer to it is "
                       f"what is asked for); got one from the {messages[-1][0]}.",
                       param=f"messages[{len(messages) - 1}].role")
    if not fmt.plain or spec is None:
        conversation = [{"role": "system" if role == "developer" else role, "content": text}
                        for role, text in messages]
        try:
            return fmt.render(conversation, add_generation_prompt=True)[0], fmt.stop
        except GptkitError as exc:
            raise ApiError(400, f"'messages': {exc}", param="messages") from None
    from gptkit.tasks import MAIN_PROMPT_FIELD

    system = "\n\n".join(text for role, text in messages if role in ("system", "developer"))
    main = MAIN_PROMPT_FIELD[spec.task]
    parts = [system] if system else []
    for role, text in messages:
        if role == "user":
            parts.append(spec.format_prompt({main: text}))
        elif role == "assistant" and parts:
            parts[-1] += spec.target_text(text)
    return "\n\n".join(parts), []


# -- the server ----------------------------------------------------------------------------

@dataclass
class _Served:
    """What every handler needs: the engine, the tokenizer, the model's name and task."""

    engine: Engine
    tokenizer: Tokenizer
    name: str
    task: TaskSpec | None
    limits: Limits
    api_key: str | None
    chat: ChatFormat  # the model's chat template, or the plain transcript
    given: str = ""  # the model as named on the command line, which clients may use too
    _mailbox: _Mailbox | None = None

    @property
    def context(self) -> int:
        return self.engine.context

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        """The one mailbox that carries engine events into `loop` (the server's)."""
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        return self._mailbox


class _Mailbox:
    """Engine events into the event loop, many per wake-up.

    One scheduler step sends an event to every running request; waking the loop once per
    event (`call_soon_threadsafe` each) would make the loop thread take the GIL that often,
    stalling the engine thread between its kernels. Events wait here until the loop,
    woken once, delivers all that have arrived.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """Called from any thread: `item` goes into `queue` on the loop's next turn."""
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:  # a wake-up is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop has closed: nobody waits for these events any more
            with self._lock:
                self._items.clear()
            raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


class _Job:
    """The engine requests of one HTTP request, their events merged into one asyncio queue.

    The engine thread hands events over through the server's `_Mailbox`; a watcher task
    notices the client leaving and cancels the requests, which frees their rows.
    """

    def __init__(self, served: _Served, prompts: list[list[int]], settings: Settings,
                 http: Request) -> None:
        from gptkit.serve.engine import GenerationRequest, QueueFull

        mailbox = served.mailbox(asyncio.get_running_loop())
        self.queue: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()
        self.http = http
        self.requests = []
        self.prompts = prompts
        context, stop = served.context, [*settings.stop, *settings.extra_stop]
        for prompt in prompts:
            room = context - len(prompt)
            if settings.max_tokens is not None and settings.max_tokens > room:
                raise ApiError(400, f"'max_tokens' {settings.max_tokens} plus the prompt's "
                               f"{len(prompt)} tokens exceed the model's context of {context} "
                               "tokens.", param="max_tokens")
            max_new = settings.max_tokens or room
            for choice in range(settings.n):
                index = len(self.requests)
                self.requests.append(GenerationRequest(
                    prompt, max_new, lambda e, i=index: mailbox.post(self.queue, (i, e)),
                    temperature=settings.temperature, top_p=settings.top_p,
                    seed=None if settings.seed is None else settings.seed + choice,
                    stop=stop, logprobs=settings.logprobs,
                    echo_logprobs=settings.echo and settings.logprobs is not None,
                    presence_penalty=settings.presence_penalty,
                    frequency_penalty=settings.frequency_penalty, top_k=settings.top_k,
                    repetition_penalty=settings.repetition_penalty, min_p=settings.min_p))
        try:
            served.engine.submit(self.requests)
        except QueueFull:
            raise ApiError(429, "The server is busy: its request queue is full; retry shortly.",
                           code="queue_full",
                           headers={"Retry-After": str(served.limits.retry_after_s)}) from None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has finished or the client has gone."""
        watcher = asyncio.create_task(self._watch())
        try:
            running = len(self.requests)
            while running:
                item = await self.queue.get()
                if item is None:
                    return
                running -= item[1].finish_reason is not None or item[1].error is not None
                yield item
        finally:
            watcher.cancel()
            for request in self.requests:
                request.cancel()

    async def _watch(self) -> None:
        while (await self.http.receive())["type"] != "http.disconnect":
            pass
        for request in self.requests:
            request.cancel()
        self.queue.put_nowait(None)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs object; text offsets count from `offset`."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [e.top for e in entries], "text_offset": offsets}


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob),
                         "top_logprobs": [item(t, v) for t, v in e.top.items()]}
                        for e in entries]}


def _sse(value: Any) -> str:
    return f"data: {json.dumps(value, ensure_ascii=False)}\n\n"


def create_app(model: str | Path, *, device: str | None = "auto", api_key: str | None = None,
               max_batch_size: int = 8, max_queue: int = 64, limits: Limits | None = None,
               dtype: str = "float32", quantize: str | None = None, compile: bool | None = None,
               cors_origins: list[str] | None = None,
               access_log: Callable[[str], None] | None = None) -> FastAPI:
    """Load the model and build the app; the engine thread runs while the app is served.

    `cors_origins` lets pages from those origins ("*": any) call the API from a browser;
    `access_log` gets one line per request (client, method, path, status, seconds).

    The model is served in the fast decoding layouts of
    `gptkit.inference.optimize_for_inference` for `dtype`, `quantize` and `compile`, as
    `gptkit generate` runs it (`compile=None`: compiled where that is the default, on CPU),
    with fp32 and bf16 weights packed for decode steps of `max_batch_size` rows on CPU.
    """
    from gptkit.checkpoint import resolve_model_dir
    from gptkit.inference import load_directory
    from gptkit.runtime import DTYPES
    from gptkit.serve.engine import Engine, ModelThread
    from gptkit.tasks import read_task_file

    limits = limits or Limits()
    if max_batch_size < 1 or max_queue < 0:
        raise GptkitError("--max-batch-size must be at least 1 and --max-queue at least 0.")
    if dtype not in ("float32", "bfloat16"):
        raise GptkitError(f"--dtype '{dtype}' is not served; expected float32 or bfloat16.")
    directory = resolve_model_dir(model)
    # Loaded in the thread that will decode it (see gptkit.serve.engine.ModelThread). On CPU
    # (by default) a step of one row runs the compiled program over the plain weights, and
    # steps over several rows a packed copy (docs/performance.md, Serving).
    thread = ModelThread()
    try:
        gpt, tokenizer = thread.submit(
            load_directory, directory, device, DTYPES[dtype], fast=True, quantize=quantize,
            compile=compile, batch_size=max_batch_size).result()
    except BaseException:
        thread.stop()
        raise
    # a chat model's answer ends at its end-of-turn token (and at end-of-text)
    eos = stop_token_ids(tokenizer) if tokenizer.chat_template is not None else None
    served = _Served(Engine(gpt, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                            eos_token_id=eos, thread=thread),
                     tokenizer, Path(str(model).rstrip("/")).name or directory.name,
                     read_task_file(directory), limits, api_key or None, chat_format(tokenizer),
                     given=str(model))
    page = (resources.files("gptkit.serve") / "playground.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served.engine.start()
        try:
            yield
        finally:
            served.engine.close()

    app = FastAPI(title="gptkit", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = served.engine
    app.state.summary = (f"context {served.context} tokens, device {gpt.device}, batch size "
                         f"{max_batch_size}, {dtype} activations, "
                         f"{quantize or dtype} weights")
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    if access_log is not None:
        app.add_middleware(_AccessLog, write=access_log)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = (f"Unknown route {request.method} {request.url.path}." if exc.status_code == 404
                   else str(exc.detail))
        return await api_error(request, ApiError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return await api_error(request, ApiError(500, "Internal server error."))

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return page

    @app.get("/health")
    async def health() -> Response:
        engine = served.engine
        status = "ok" if engine.alive else "engine stopped"
        return JSONResponse({"status": status, "model": served.name,
                             "auth": served.api_key is not None, **engine.stats()},
                            status_code=200 if engine.alive else 503)

    def model_card() -> dict[str, Any]:
        task = served.task and {"name": served.task.task,
                                "fields": list(served.task.prompt_fields),
                                "optional": list(served.task.optional)}
        return {"id": served.name, "object": "model", "created": 0, "owned_by": "gptkit",
                "context_length": served.context, "task": task, "chat": not served.chat.plain}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, served.api_key)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(request: Request, model_id: str) -> dict[str, Any]:
        _authorize(request, served.api_key)
        _check_model({"model": model_id}, served)
        return model_card()

    @app.post("/v1/task/prompt")
    async def task_prompt(request: Request) -> dict[str, str]:
        """The playground's task mode: the prompt the model's task template makes of fields."""
        body = await _read_body(request, served)
        if served.task is None:
            raise ApiError(400, f"'{served.name}' was not fine-tuned for a task.", param="fields")
        _check_fields(body, ("fields",))
        fields = body.get("fields")
        if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
            raise _bad("fields", "an object of strings", fields)
        roles = (*served.task.prompt_fields, *served.task.optional)
        _check_fields(fields, roles)
        return {"prompt": served.task.format_prompt(fields)}

    async def sampling_request(request: Request, allowed: tuple[str, ...]
                               ) -> tuple[dict[str, Any], Settings]:
        body = await _read_body(request, served)
        _check_fields(body, allowed)
        _check_model(body, served)
        return body, _settings(body, limits, served.context)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, settings = await sampling_request(request, COMPLETION_FIELDS)
        settings.echo = _boolean(body, "echo")
        settings.logprobs = _integer(body, "logprobs", None, 0, limits.max_completion_logprobs)
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required.", param="prompt")
        prompts = await run_in_threadpool(_encode_prompts, body["prompt"], served)
        if settings.max_tokens is None:
            settings.max_tokens = min(COMPLETIONS_DEFAULT_MAX_TOKENS,
                                      served.context - max(map(len, prompts)))
        if len(prompts) * settings.n > limits.max_choices:
            raise ApiError(400, f"{len(prompts)} prompts x n={settings.n} ask for more than "
                           f"{limits.max_choices} completions.", param="n")
        job = _Job(served, prompts, settings, request)
        echoes = [tokenizer.decode(p) if settings.echo else "" for p in prompts]
        return await _respond(job, settings, _CompletionShape(served.name, echoes, settings.n))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body, settings = await sampling_request(request, CHAT_FIELDS)
        if body.get("max_completion_tokens") is not None:
            if settings.max_tokens is not None:
                raise ApiError(400, "Pass either 'max_tokens' or 'max_completion_tokens'.",
                               param="max_completion_tokens")
            settings.max_tokens = _integer(body, "max_completion_tokens", None, 1,
                                           served.context - 1)
        top = _integer(body, "top_logprobs", None, 0, limits.max_chat_top_logprobs)
        if top is not None and not _boolean(body, "logprobs"):
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        settings.logprobs = (top or 0) if _boolean(body, "logprobs") else None
        form = body.get("response_format")
        if form is not None and form != {"type": "text"}:
            raise ApiError(400, f"'response_format' {_show(form)} is not supported; this server "
                           'answers in text ({"type": "text"}).', param="response_format")
        _boolean(body, "parallel_tool_calls")
        turns = _turns(body, limits)
        text, settings.extra_stop = render_chat(turns, served.task, served.chat)
        prompts = await run_in_threadpool(_encode_prompts, text, served, "messages")
        job = _Job(served, prompts, settings, request)
        return await _respond(job, settings, _ChatShape(served.name, settings.n))

    @app.post("/v1/chat/fit")
    async def chat_fit(request: Request) -> dict[str, Any]:
        """The playground's context handling, `gptkit chat`'s (`conversation.fit_chat`): the
        messages that fit with room for `max_tokens` (the earliest exchanges dropped), how
        many were dropped, and the answer's length limit."""
        body = await _read_body(request, served)
        _check_fields(body, ("model", "messages", "max_tokens"))
        _check_model(body, served)
        wanted = _integer(body, "max_tokens", None, 1, 2**31 - 1)
        turns = _turns(body, limits)
        render_chat(turns, served.task, served.chat)  # the same 400s as chat completions
        messages = [{"role": "system" if role == "developer" else role, "content": text}
                    for role, text in turns]

        def encode(kept: list[dict[str, str]]) -> list[int]:
            text = render_chat([(m["role"], m["content"]) for m in kept], served.task,
                               served.chat)[0]
            return tokenizer.encode_prompt(text) or [tokenizer.eos_token_id]

        default = max(1, min(256, served.context // 2))  # as `gptkit chat`
        try:
            ids, kept, room = await run_in_threadpool(
                fit_chat, encode, messages, served.context, wanted or default)
        except GptkitError as exc:
            raise ApiError(400, f"'messages': {exc}", param="messages") from None
        return {"messages": kept, "dropped": len(messages) - len(kept), "prompt_tokens": len(ids),
                "max_tokens": room, "context_length": served.context}

    async def _respond(job: _Job, settings: Settings, shape: _Shape) -> Response:
        if settings.stream:
            return StreamingResponse(_stream(job, settings, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        completion_tokens = 0
        async for index, event in job.events():
            if event.error:
                raise ApiError(event.status, f"Generation failed: {event.error}.")
            shape.add(index, event)
            completion_tokens += event.completion_tokens
        return JSONResponse({**shape.whole(), "usage": _usage(job.prompt_tokens,
                                                               completion_tokens)})

    async def _stream(job: _Job, settings: Settings, shape: _Shape) -> AsyncIterator[str]:
        completion_tokens = 0
        for first in shape.opening():
            yield _sse(first)
        async for index, event in job.events():
            if event.error:
                yield _sse(ApiError(event.status, f"Generation failed: {event.error}.").body())
                return
            completion_tokens += event.completion_tokens
            if event.text or event.logprobs or event.finish_reason:
                yield _sse(shape.chunk(index, event))
        if settings.include_usage:
            yield _sse({**shape.header(), "choices": [],
                        "usage": _usage(job.prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"

    return app


class _AccessLog:
    """One line per request once its response has ended (a stream at its last byte), as
    plain ASGI so that streams and disconnect detection pass through untouched."""

    def __init__(self, app: Any, write: Callable[[str], None]) -> None:
        self.app, self.write = app, write

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [0]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("-", 0)
            self.write(f"{client[0]} {scope['method']} {scope['path']} {status[0] or '-'} "
                       f"{time.perf_counter() - start:.3f}s")


# -- response shapes -----------------------------------------------------------------------

class _Shape:
    """Builds one endpoint's OpenAI response: whole, or as stream chunks."""

    object_name = chunk_name = id_prefix = ""

    def __init__(self, model: str, choices: int) -> None:
        self.model = model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.texts = [""] * choices
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(choices)]
        self.finish: list[str | None] = [None] * choices

    def header(self, name: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": name or self.chunk_name, "created": self.created,
                "model": self.model}

    def add(self, index: int, event: Event) -> None:
        self.texts[index] += event.text
        self.logprobs[index] += event.logprobs
        self.finish[index] = event.finish_reason or self.finish[index]

    def opening(self) -> list[dict[str, Any]]:
        return []

    def whole(self) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, index: int, event: Event) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionShape(_Shape):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, model: str, echoes: list[str], n: int) -> None:
        super().__init__(model, len(echoes) * n)
        self.echoes = [e for e in echoes for _ in range(n)]  # choice i belongs to prompt i // n
        self.offsets = [0] * len(self.echoes)

    def whole(self) -> dict[str, Any]:
        return {**self.header(), "choices": [
            {"index": i, "text": self.echoes[i] + text, "finish_reason": self.finish[i],
             "logprobs": _completion_logprobs(self.logprobs[i], 0) if self.logprobs[i] else None}
            for i, text in enumerate(self.texts)]}

    def opening(self) -> list[dict[str, Any]]:
        return [{**self.header(), "choices": [
            {"index": i, "text": echo, "logprobs": None, "finish_reason": None}]}
            for i, echo in enumerate(self.echoes) if echo]

    def chunk(self, index: int, event: Event) -> dict[str, Any]:
        logprobs = None
        if event.logprobs:
            logprobs = _completion_logprobs(event.logprobs, self.offsets[index])
            self.offsets[index] += sum(len(e.token) for e in event.logprobs)
        return {**self.header(), "choices": [{"index": index, "text": event.text,
                                              "logprobs": logprobs,
                                              "finish_reason": event.finish_reason}]}


class _ChatShape(_Shape):
    object_name, chunk_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def whole(self) -> dict[str, Any]:
        return {**self.header(self.object_name), "choices": [
            {"index": i, "message": {"role": "assistant", "content": text},
             "finish_reason": self.finish[i],
             "logprobs": _chat_logprobs(self.logprobs[i]) if self.logprobs[i] else None}
            for i, text in enumerate(self.texts)]}

    def opening(self) -> list[dict[str, Any]]:
        return [{**self.header(), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]} for i in range(len(self.texts))]

    def chunk(self, index: int, event: Event) -> dict[str, Any]:
        delta = {"content": event.text} if event.text else {}
        return {**self.header(), "choices": [{
            "index": index, "delta": delta, "finish_reason": event.finish_reason,
            "logprobs": _chat_logprobs(event.logprobs) if event.logprobs else None}]}


# -- request plumbing --------------------------------------------------------------------

def _authorize(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <key>` (compared in constant time)."""
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not given:
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")
    if not hmac.compare_digest(given.encode("utf-8", "replace"),
                               f"Bearer {api_key}".encode()):
        raise ApiError(401, "Incorrect API key.", code="invalid_api_key")


async def _read_body(request: Request, served: _Served) -> dict[str, Any]:
    """Authorize, then read at most `max_body_bytes` and parse them as one JSON object."""
    _authorize(request, served.api_key)
    limit = served.limits.max_body_bytes
    too_big = ApiError(413, f"The request body is larger than {limit} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"The request body is not UTF-8: byte 0x{raw[exc.start]:02x} at "
                       f"position {exc.start}; send JSON encoded as UTF-8.") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "too deeply nested"
        raise ApiError(400, f"The request body is not valid JSON ({reason}).") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object; got a JSON "
                       f"{type(body).__name__}.")
    return body


def _turns(body: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
    """(role, text) of each of the request's chat messages, checked."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not 0 < len(messages) <= limits.max_messages:
        raise _bad("messages", f"a list of 1 to {limits.max_messages} messages", messages)
    return [_message_text(m, i) for i, m in enumerate(messages)]


def _check_model(body: dict[str, Any], served: _Served) -> None:
    """The request's "model" is the served name or the model exactly as the server was
    started with it (a path or hub id, as vLLM and `transformers serve` name models)."""
    model = body.get("model", served.name)
    if model not in (served.name, served.given):
        raise ApiError(404, f"The model {_show(model)} does not exist; this server serves "
                       f"'{served.name}'.", param="model", code="model_not_found")


def _encode_prompts(prompt: Any, served: _Served, param: str = "prompt") -> list[list[int]]:
    """Token ids of a prompt: a string, a list of strings, a list of ids or a list of those.

    Runs in a worker thread: a long prompt must not hold up the event loop.
    """
    vocab, limits = served.tokenizer.vocab_size, served.limits

    def is_ids(value: Any) -> bool:
        return (isinstance(value, list) and len(value) > 0
                and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                        for t in value))

    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif (isinstance(prompt, list) and 0 < len(prompt) <= limits.max_prompts
          and all(isinstance(p, str) or is_ids(p) for p in prompt)):
        prompts = prompt
    else:
        raise _bad(param, f"a string, a list of at most {limits.max_prompts} strings, or token "
                   f"ids below {vocab}", prompt)
    encoded = []
    for text in prompts:
        try:
            ids = served.tokenizer.encode_prompt(text) if isinstance(text, str) else text
        except GptkitError as exc:
            raise ApiError(400, f"'{param}': {exc}", param=param) from None
        # An empty prompt starts from end-of-text, as GPT-2 begins a document.
        ids = ids or [served.tokenizer.eos_token_id]
        if len(ids) >= served.context:
            raise ApiError(400, f"The prompt is {len(ids)} tokens long; this model's context of "
                           f"{served.context} tokens leaves no room to generate.", param=param)
        encoded.append(ids)
    return encoded


# -- running it ------------------------------------------------------------------------------

def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning for serving beyond this machine without a key, or None."""
    if host in LOCAL_HOSTS or api_key:
        return None
    return (f"warning: serving on {host} without --api-key: anyone who can reach this machine "
            "can use the model. Pass --api-key (or set GPTKIT_API_KEY).")


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port for uvicorn, or one sentence saying why there is
    none (a port out of range or taken, an address this machine does not have)."""
    if not 0 <= port <= 65535:
        raise GptkitError(f"--port {port} is out of range; expected 0 to 65535.")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise GptkitError(f"cannot listen on --host {host}: {exc.strerror}.") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GptkitError(f"port {port} on {host} is already in use (another server?); "
                              "stop it or pick another --port.") from None
        raise GptkitError(f"cannot listen on {host}:{port} ({exc.strerror or exc}).") from None
    sock.set_inheritable(True)
    return sock


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch_size: int = 8, max_queue: int = 64,
          device: str | None = "auto", dtype: str = "float32", quantize: str | None = None,
          compile: bool | None = None, cors_origins: list[str] | None = None) -> None:
    """Serve `model` until Ctrl-C or SIGTERM (uvicorn finishes open responses, then exits).

    The port is taken before the model loads, so a busy one is said at once, and the
    banner appears only once the server can answer; each request then gets a log line.
    """
    import uvicorn

    sock = listen(host, port)
    warning = bind_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        app = create_app(model, device=device, api_key=api_key, max_batch_size=max_batch_size,
                         max_queue=max_queue, dtype=dtype, quantize=quantize, compile=compile,
                         cors_origins=cors_origins,
                         access_log=lambda line: print(line, file=sys.stderr, flush=True))
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"gptkit serve: http://{shown}:{port}/ (playground) and http://{shown}:{port}/v1 "
          "(OpenAI API); Ctrl-C to stop", flush=True)
    print(f"gptkit serve: {app.state.summary}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    engine: Engine = app.state.engine

    def stop_serving() -> None:  # the engine cannot recover: stop taking requests, exit non-zero
        server.should_exit = True

    engine.on_fatal = stop_serving
    # uvicorn re-raises SIGTERM after its graceful shutdown; a requested stop exits with 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run(sockets=[sock])
    if engine.fatal is not None:
        raise GptkitError(f"the generation engine stopped ({type(engine.fatal).__name__}: "
                          f"{engine.fatal}); the server has shut down.")
