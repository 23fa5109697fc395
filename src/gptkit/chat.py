"""`gptkit chat`: a conversation with a model in the terminal.

    gptkit chat --model runs/chat --system "Answer briefly." --temperature 0.7

Answers stream as they are generated. The conversation is rendered with the model's chat
template (`gptkit.conversation`) and generation stops at its end-of-turn token, so the
same conversation gets the same greedy answer here, from `ChatSession` in Python and from
`gptkit serve`. Commands: /reset, /system TEXT, /save FILE, /load FILE, /set NAME VALUE,
/regen, /help, /exit; a message spans lines in a \"\"\" block or with a trailing backslash.
Ctrl-C stops the answer being written (what was written stays in the history with its
message; a message stopped before any answer is dropped), Ctrl-D or /exit ends.
When the history outgrows the context, its oldest exchanges are dropped with a notice.
A model without a chat template talks in a plain "User: / Assistant:" transcript.

    session = ChatSession(model, tokenizer, max_new_tokens=64)
    answer, stopped = session.respond("Hello!", print)
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from gptkit.conversation import (
    Message,
    chat_format,
    check_messages,
    fit_chat,
    prompt_ids,
    read_conversations,
    stop_token_ids,
    write_conversation,
)
from gptkit.errors import GptkitError
from gptkit.generate import check_sampling, stream_generate

if TYPE_CHECKING:
    from gptkit.model import GPT
    from gptkit.tokenizer import Tokenizer

HELP = """commands:
  /reset           start a new conversation (the system message stays)
  /system TEXT     set the system message (/system alone removes it)
  /save FILE       append the conversation to FILE as one JSONL line (the training shape)
  /load FILE       go on with the last conversation of FILE (what /save wrote)
  /set NAME VALUE  change a setting: temperature, top_p, top_k, repetition_penalty,
                   max_new_tokens, seed, verbose (on/off: each answer's speed); /set lists them
  /regen           answer the last message again
  /help            this list
  /exit            end the chat (Ctrl-D too); Ctrl-C stops an answer
a message spans lines between \"\"\" and \"\"\", or while a line ends with a backslash"""
SETTINGS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed",
            "verbose")


@dataclass(frozen=True)
class Speed:
    """How fast one answer came: the prompt read until the first piece of the answer, then
    the rest of the answer (its text's tokens, counted by encoding it again)."""

    prompt_tokens: int
    prompt_seconds: float
    answer_tokens: int
    answer_seconds: float

    def __str__(self) -> str:
        def rate(tokens: int, seconds: float) -> str:
            return f"{tokens / max(seconds, 1e-6):.1f} tokens/s"

        return (f"prompt {self.prompt_tokens} tokens, {rate(self.prompt_tokens, self.prompt_seconds)}"
                f" · answer {self.answer_tokens} tokens, "
                f"{rate(max(self.answer_tokens - 1, 0), self.answer_seconds)}")


class ChatSession:
    """A conversation with one model: its history, and answers generated turn by turn.

    `sampling` takes `generate`'s sampling arguments (do_sample, temperature, top_k, top_p,
    repetition_penalty, seed); none means greedy. A seed seeds one random stream for the
    whole conversation, so answers differ from turn to turn yet a chat can be repeated.
    An answer may be up to `max_new_tokens` long (default: 256, at most half the context);
    the history is shortened (oldest exchanges first) so that it fits beside it.
    The history (`messages`, which may be set by hand) holds answered exchanges: it never
    ends with a user message, whose answer would be asked for together with the next.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, system: str | None = None,
                 max_new_tokens: int | None = None, sampling: dict[str, Any] | None = None,
                 notice: Callable[[str], None] | None = None) -> None:
        import torch

        self.model, self.tokenizer = model, tokenizer
        self.format = chat_format(tokenizer)
        self.sampling = dict(sampling or {})
        check_sampling(**self.sampling)
        seed = self.sampling.pop("seed", None)
        self.generator = None if seed is None else torch.Generator(model.device).manual_seed(seed)
        self.speed: Speed | None = None  # of the last answer
        sampled = self.sampling.get("do_sample", False)
        self._choices = {"temperature": self.sampling.get("temperature", 1.0) if sampled else 0,
                         "top_k": self.sampling.get("top_k"), "top_p": self.sampling.get("top_p"),
                         "repetition_penalty": self.sampling.get("repetition_penalty", 1.0)}
        context = model.config.block_size
        if max_new_tokens is None:  # a default that fits any model, leaving room for history
            max_new_tokens = max(1, min(256, context // 2))
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens < context:
            raise GptkitError(f"--max-new-tokens is {max_new_tokens}; expected 1 to {context - 1} "
                              f"(the model's context is {context} tokens).")
        self.max_new_tokens = max_new_tokens
        self.notice = notice or (lambda text: print(text, file=sys.stderr, flush=True))
        self.system = system or None
        self._messages: list[Message] = []
        self.reset()

    @property
    def messages(self) -> list[Message]:
        """The conversation so far: system messages, then user messages and their answers."""
        return self._messages

    @messages.setter
    def messages(self, value: list[Message]) -> None:
        messages = check_messages(value, "the session's history") if value else []
        if messages and messages[-1]["role"] == "user":
            raise GptkitError("the session's history ends with a user message that has no "
                              "answer; end it with the assistant's answer, or pass that message "
                              "to respond().")
        self._messages = messages

    @property
    def plain(self) -> bool:
        """True for a model without a chat template (a plain transcript)."""
        return self.format.plain

    def reset(self) -> None:
        """Forget the conversation; the system message stays."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def set_system(self, text: str | None) -> None:
        """Set (or, with None or "", remove) the system message of this conversation."""
        self.system = text or None
        rest = [m for m in self.messages if m["role"] != "system"]
        self.messages = [{"role": "system", "content": self.system}, *rest] if self.system else rest

    def save(self, path: str | Path) -> Path:
        """Append the conversation to a JSONL file, one line in the training shape."""
        if not any(m["role"] != "system" for m in self.messages):
            raise GptkitError("the conversation is empty; nothing to save.")
        path = Path(path).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(write_conversation(self.messages))
        except OSError as exc:
            raise GptkitError(f"could not write {path} ({exc.strerror or exc}).") from None
        return path

    def settings(self) -> dict[str, Any]:
        """The settings `configure` changes, as they are now (temperature 0: greedy)."""
        return {**self._choices, "max_new_tokens": self.max_new_tokens}

    def configure(self, name: str, value: Any) -> None:
        """Change one setting mid-chat: temperature (0: greedy), top_p, top_k,
        repetition_penalty (None: off), max_new_tokens, or seed (a new random stream)."""
        import torch

        from gptkit.generate import sampling_settings

        if name == "max_new_tokens":
            context = self.model.config.block_size
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < context:
                raise GptkitError(f"max_new_tokens is {value}; expected 1 to {context - 1} (the "
                                  f"model's context is {context} tokens).")
            self.max_new_tokens = value
        elif name == "seed":
            check_sampling(seed=value)
            self.generator = torch.Generator(self.model.device).manual_seed(value)
        elif name in self._choices:
            choices = {**self._choices, name: value}
            temperature = choices["temperature"]
            self.sampling = sampling_settings(
                greedy=temperature == 0, temperature=temperature or 1.0, top_k=choices["top_k"],
                top_p=choices["top_p"], repetition_penalty=choices["repetition_penalty"] or 1.0)
            self._choices = choices
        else:
            raise GptkitError(f"there is no setting '{name}'; expected one of "
                              f"{', '.join(SETTINGS[:-1])}.")  # verbose is the terminal's

    def load(self, path: str | Path) -> int:
        """Go on with the last conversation of a JSONL file (what `save` appends); its
        system message becomes the session's. Returns how many messages it holds."""
        messages = read_conversations(Path(path).expanduser())[-1].messages
        self.messages = messages
        self.system = next((m["content"] for m in messages if m["role"] == "system"), None)
        return len(messages)

    def prompt(self, text: str) -> tuple[str, int, list[Message]]:
        """The prompt asking for an answer to the user message `text` after the history,
        the answer's length limit, and the messages the prompt holds: the oldest exchanges
        are dropped (with a notice) when they do not fit. The history stays as it is."""
        _, kept, room = self._fit(text)
        return self.format.render(kept, add_generation_prompt=True)[0], room, kept

    def _fit(self, text: str) -> tuple[list[int], list[Message], int]:
        context = self.model.config.block_size
        messages = [*self.messages, {"role": "user", "content": text}]
        ids, kept, room = fit_chat(lambda m: prompt_ids(self.tokenizer, self.format, m),
                                   messages, context, self.max_new_tokens)
        dropped = len(messages) - len(kept)
        if dropped:
            self.notice(f"(the conversation outgrew the model's context of {context} tokens: "
                        f"dropped its {dropped} oldest messages)")
        return ids, kept, room

    def respond(self, text: str, write: Callable[[str], Any]) -> tuple[str, bool]:
        """Answer the user message `text`, passing each piece of the answer to `write` as
        it is generated; Ctrl-C (KeyboardInterrupt) stops the answer. Returns the answer and
        whether it was stopped; `speed` then tells how fast it came.

        The history changes in one assignment at the end, so a Ctrl-C anywhere leaves it
        whole: the message joins it with its answer, whole or stopped part-way; a message
        stopped before its first piece of answer (or a Ctrl-C escaping from here) leaves
        the history as it was, as if the message had not been sent.
        """
        ids, kept, room = self._fit(text)
        prompt = self.format.render(kept, add_generation_prompt=True)[0]  # encodes to `ids`
        pieces: list[str] = []
        stopped = False
        stream = None
        start, first = time.perf_counter(), None
        try:
            stream = stream_generate(
                self.model, self.tokenizer, prompt, max_new_tokens=room,
                eos_token_id=stop_token_ids(self.tokenizer), stop=self.format.stop or None,
                generator=self.generator, **self.sampling)
            for piece in stream:
                first = first or time.perf_counter()
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            stopped = True
        finally:
            if stream is not None:
                stream.close()
        answer = "".join(pieces)
        if first is not None:
            self.speed = Speed(len(ids), first - start, len(self.tokenizer.encode(answer)),
                               time.perf_counter() - first)
        if answer or not stopped:
            self.messages = [*kept, {"role": "assistant", "content": answer}]
        return answer, stopped

    def regenerate(self, write: Callable[[str], Any]) -> tuple[str, bool]:
        """Answer the last user message again, in place of its answer (as `respond`); a
        Ctrl-C before the new answer begins keeps the old one."""
        before = self.messages
        last = max((i for i, m in enumerate(before) if m["role"] == "user"), default=None)
        if last is None:
            raise GptkitError("there is no message to answer again yet.")
        truncated = self._messages = before[:last]
        try:
            return self.respond(before[last]["content"], write)
        finally:
            if self._messages is truncated:  # no new answer: the old one stays
                self._messages = before


def chat_in_terminal(session: ChatSession, name: str, *, read: Callable[[str], str] = input,
                     out: TextIO | None = None, verbose: bool = False) -> None:
    """The interactive loop of `gptkit chat` over `session`: a message in, an answer out;
    `verbose` adds each answer's speed (the /set verbose setting)."""
    out = out or sys.stdout
    options = {"verbose": verbose}

    def say(text: str = "", end: str = "\n") -> None:
        out.write(text + end)
        out.flush()

    if read is input and sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    context = session.model.config.block_size
    say(f"gptkit chat with {name} (context {context} tokens). /help lists the commands; "
        "Ctrl-C stops an answer, Ctrl-D ends.")
    if session.plain:
        session.notice(f"note: {name} has no chat template; talking in a plain "
                       "'User: ... Assistant: ...' transcript.")
    while True:
        try:
            line = read_message(read)
        except EOFError:
            say()
            return
        except KeyboardInterrupt:
            say("\n(Ctrl-C stops an answer; /exit or Ctrl-D ends the chat)")
            continue
        except UnicodeDecodeError as exc:  # the terminal sent bytes that are not UTF-8
            say(f"error: what you typed is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} "
                f"at byte {exc.start + 1} of the line; the message was not sent.")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and "\n" not in text:
            if text.partition(" ")[0] == "/regen":
                answer_with(session, session.regenerate, say, options)
            elif not _command(session, text, say, options):
                return
            continue
        undecodable = next((i for i, c in enumerate(line) if "\udc80" <= c <= "\udcff"), None)
        if undecodable is not None:  # a byte the terminal's encoding could not read
            say(f"error: what you typed is not UTF-8 text: byte "
                f"0x{ord(line[undecodable]) - 0xdc00:02x} at character {undecodable + 1} of the "
                "message; the message was not sent.")
            continue
        answer_with(session, functools.partial(session.respond, line), say, options)


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line; a line ending in a backslash goes on in the next; a block
    between \"\"\" and \"\"\" (as in ollama) keeps its lines as they are."""
    line = read("> ")
    if line.lstrip().startswith('"""'):
        lines = [line.lstrip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            lines.append(read("... "))
        return "\n".join(lines).rstrip()[:-3].strip("\n")
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = read("... ")
    return "\n".join([*parts, line])


def answer_with(session: ChatSession, respond: Callable[[Callable[[str], Any]], tuple[str, bool]],
                say: Callable[..., None], options: dict[str, Any]) -> None:
    """Stream one answer of `respond` (a new message's, or /regen's) and say how it ended."""
    session.speed = None
    try:
        answer, stopped = respond(lambda piece: say(piece, end=""))
    except GptkitError as exc:
        say(f"error: {exc}")
        return
    except KeyboardInterrupt:  # while the prompt was being built
        answer, stopped = "", True
    if stopped and not answer:
        say("[stopped before an answer; the message was dropped from the history]")
    else:
        say(" [stopped]" if stopped else "")
    if options["verbose"] and session.speed is not None:
        say(f"({session.speed})")
    say()


def _setting(name: str, value: str) -> Any:
    """A /set value as its type: "none" or "off" turns top_k, top_p or the penalty off."""
    if name in ("top_k", "top_p", "repetition_penalty") and value.lower() in ("none", "off"):
        return None
    try:
        return int(value) if name in ("top_k", "max_new_tokens", "seed") else float(value)
    except ValueError:
        kind = "an integer" if name in ("top_k", "max_new_tokens", "seed") else "a number"
        raise GptkitError(f"{name} must be {kind}; got {value!r}.") from None


def _command(session: ChatSession, text: str, say: Callable[..., None],
             options: dict[str, Any]) -> bool:
    """Run one /command; False ends the chat."""
    name, _, argument = text.partition(" ")
    argument = argument.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        say("(new conversation)")
    elif name == "/system":
        session.set_system(argument)
        say(f"(system message set: {argument})" if argument else "(system message removed)")
    elif name in ("/save", "/load"):
        if not argument:
            say(f"error: {name} needs a file name, e.g. {name} chats.jsonl")
            return True
        try:
            if name == "/save":
                say(f"(conversation appended to {session.save(argument)})")
            else:
                count = session.load(argument)
                say(f"(loaded the last conversation of {argument}: {count} messages)")
        except GptkitError as exc:
            say(f"error: {exc}")
    elif name == "/set":
        setting, _, value = argument.partition(" ")
        value = value.strip()
        try:
            if not setting or not value:
                now = {**session.settings(), "verbose": "on" if options["verbose"] else "off"}
                say("settings: " + ", ".join(f"{k} {v}" for k, v in now.items())
                    + "; change one with /set NAME VALUE")
            elif setting not in SETTINGS:
                raise GptkitError(f"there is no setting '{setting}'; expected one of "
                                  f"{', '.join(SETTINGS)}.")
            elif setting == "verbose":
                if value not in ("on", "off"):
                    raise GptkitError(f"verbose is on or off; got {value!r}.")
                options["verbose"] = value == "on"
                say(f"(verbose {value})")
            else:
                session.configure(setting, _setting(setting, value))
                say(f"({setting} set to {value})")
        except GptkitError as exc:
            say(f"error: {exc}")
    elif name == "/help":
        say(HELP)
    else:
        say(f"unknown command {name}; /help lists the commands.")
    return True
