"""`gptkit chat`: a conversation with a model in the terminal.

    gptkit chat --model runs/chat --system "Answer briefly." --temperature 0.7

Answers stream as they are generated. The conversation is rendered with the model's chat
template (`gptkit.conversation`) and generation stops at its end-of-turn token, so the
same conversation gets the same greedy answer here, from `ChatSession` in Python and from
`gptkit serve`. Commands: /reset, /system TEXT, /save FILE, /help, /exit. Ctrl-C stops
the answer being written (what was written stays in the history with its message; a
message stopped before any answer is dropped), Ctrl-D or /exit ends.
When the history outgrows the context, its oldest exchanges are dropped with a notice.
A model without a chat template talks in a plain "User: / Assistant:" transcript.

    session = ChatSession(model, tokenizer, max_new_tokens=64)
    answer, stopped = session.respond("Hello!", print)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from gptkit.conversation import (
    Message,
    chat_format,
    check_messages,
    fit_prompt,
    prompt_ids,
    stop_token_ids,
    write_conversation,
)
from gptkit.errors import GptkitError
from gptkit.generate import check_sampling, stream_generate

if TYPE_CHECKING:
    from gptkit.model import GPT
    from gptkit.tokenizer import Tokenizer

HELP = """commands:
  /reset        start a new conversation (the system message stays)
  /system TEXT  set the system message (/system alone removes it)
  /save FILE    append the conversation to FILE as one JSONL line (the training shape)
  /help         this list
  /exit         end the chat (Ctrl-D too); Ctrl-C stops an answer"""


class ChatSession:
    """A conversation with one model: its history, and answers generated turn by turn.

    `sampling` takes `generate`'s sampling arguments (do_sample, temperature, top_k, top_p,
    repetition_penalty, seed); none means greedy. An answer may be up to `max_new_tokens`
    long; the history is shortened (oldest exchanges first) so that it fits beside it.
    The history (`messages`, which may be set by hand) holds answered exchanges: it never
    ends with a user message, whose answer would be asked for together with the next.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, system: str | None = None,
                 max_new_tokens: int = 256, sampling: dict[str, Any] | None = None,
                 notice: Callable[[str], None] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.format = chat_format(tokenizer)
        self.sampling = dict(sampling or {})
        check_sampling(**self.sampling)
        context = model.config.block_size
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

    def prompt(self, text: str) -> tuple[str, int, list[Message]]:
        """The prompt asking for an answer to the user message `text` after the history,
        the answer's length limit, and the messages the prompt holds: the oldest exchanges
        are dropped (with a notice) when they do not fit. The history stays as it is."""
        context = self.model.config.block_size
        messages = [*self.messages, {"role": "user", "content": text}]
        fitted = fit_prompt(self.tokenizer, self.format, messages, context - self.max_new_tokens)
        if fitted is None:  # the message alone leaves less room than asked for: answer shorter
            fitted = fit_prompt(self.tokenizer, self.format, messages, context - 1)
        if fitted is None:
            alone = len(prompt_ids(self.tokenizer, self.format, messages[-1:]))
            raise GptkitError(f"the message is {alone} tokens long with its template; the model's "
                              f"context of {context} tokens leaves no room to answer.")
        ids, kept = fitted
        dropped = len(messages) - len(kept)
        if dropped:
            self.notice(f"(the conversation outgrew the model's context of {context} tokens: "
                        f"dropped its {dropped} oldest messages)")
        prompt = self.format.render(kept, add_generation_prompt=True)[0]  # encodes to `ids`
        return prompt, min(self.max_new_tokens, context - len(ids)), kept

    def respond(self, text: str, write: Callable[[str], Any]) -> tuple[str, bool]:
        """Answer the user message `text`, passing each piece of the answer to `write` as
        it is generated; Ctrl-C (KeyboardInterrupt) stops the answer. Returns the answer and
        whether it was stopped.

        The history changes in one assignment at the end, so a Ctrl-C anywhere leaves it
        whole: the message joins it with its answer, whole or stopped part-way; a message
        stopped before its first piece of answer (or a Ctrl-C escaping from here) leaves
        the history as it was, as if the message had not been sent.
        """
        prompt, room, kept = self.prompt(text)
        pieces: list[str] = []
        stopped = False
        stream = None
        try:
            stream = stream_generate(
                self.model, self.tokenizer, prompt, max_new_tokens=room,
                eos_token_id=stop_token_ids(self.tokenizer), stop=self.format.stop or None,
                **self.sampling)
            for piece in stream:
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            stopped = True
        finally:
            if stream is not None:
                stream.close()
        answer = "".join(pieces)
        if answer or not stopped:
            self.messages = [*kept, {"role": "assistant", "content": answer}]
        return answer, stopped


def chat_in_terminal(session: ChatSession, name: str, *, read: Callable[[str], str] = input,
                     out: TextIO | None = None) -> None:
    """The interactive loop of `gptkit chat` over `session`: a line in, an answer out."""
    out = out or sys.stdout

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
            line = read("> ")
        except EOFError:
            say()
            return
        except KeyboardInterrupt:
            say("\n(Ctrl-C stops an answer; /exit or Ctrl-D ends the chat)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(session, text, say):
                return
            continue
        try:
            answer, stopped = session.respond(line, lambda piece: say(piece, end=""))
        except GptkitError as exc:
            say(f"error: {exc}")
            continue
        except KeyboardInterrupt:  # while the prompt was being built
            answer, stopped = "", True
        if stopped and not answer:
            say("[stopped before an answer; the message was dropped from the history]")
        else:
            say(" [stopped]" if stopped else "")
        say()


def _command(session: ChatSession, text: str, say: Callable[..., None]) -> bool:
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
    elif name == "/save":
        if not argument:
            say("error: /save needs a file name, e.g. /save chats.jsonl")
            return True
        try:
            say(f"(conversation appended to {session.save(argument)})")
        except GptkitError as exc:
            say(f"error: {exc}")
    elif name == "/help":
        say(HELP)
    else:
        say(f"unknown command {name}; /help lists the commands.")
    return True
