"""Conversations: their JSONL shapes, the chat template, and token ids with loss masks.

A conversation file holds one JSON object per line, in OpenAI's shape or ShareGPT's:

    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]}
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}

A chat model renders conversations with the Jinja `chat_template` its tokenizer carries:
ChatML (`CHATML_TEMPLATE`) for the models `gptkit finetune --task chat` makes, each turn
`<|im_start|>role\\n...<|im_end|>\\n` with the assistant's text and its `<|im_end|>` inside
`{% generation %}` markers. Templates render as transformers renders them (same sandbox,
same markers) and token ids come from the rendered text as a whole, so
`AutoTokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True)` gives the
ids and loss mask of `encode_conversation`, and `add_generation_prompt=True` the ids of
`prompt_ids`. A model without a template talks in a plain transcript ("User: ..." /
"Assistant: ...", stopping at the next "User:"), as the server always did for base models.

    fmt = chat_format(tokenizer)
    ids, labels = encode_conversation(tokenizer, fmt, messages)   # loss on assistant turns
    ids = prompt_ids(tokenizer, fmt, messages)                      # for generating the answer
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptkit.errors import GptkitError

if TYPE_CHECKING:
    from gptkit.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# ShareGPT's speakers (and the OpenAI names some ShareGPT files use) -> roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TASK = "chat"

# ChatML (as Qwen's and many other chat models' tokenizers carry it), with transformers'
# {% generation %} markers around what the assistant writes: its text and its <|im_end|>.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The plain transcript of a model without a template ends the assistant's turn here.
PLAIN_STOP = "\nUser:"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Message = dict[str, str]
Encoded = tuple[list[int], list[int]]  # token ids, labels (IGNORE_INDEX but on assistant turns)
Span = tuple[int, int]  # characters [start, end) of the rendered text


# -- records --------------------------------------------------------------------------------

@dataclass
class Conversation:
    """One record: its messages (role, content), where it came from, and the task whose
    metrics score its last answer in `gptkit eval --task chat` (the record's "task", if any)."""

    messages: list[Message]
    where: str
    task: str | None = None


def read_conversations(path: str | Path, *, limit: int | None = None) -> list[Conversation]:
    """Every conversation of a JSONL file, checked: one clear error naming line and field."""
    from gptkit.data import jsonl_records

    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path} does not exist or is not a file; expected a JSONL file of "
                          "conversations.")
    conversations = []
    for where, record in jsonl_records(path):
        conversations.append(parse_conversation(record, where))
        if limit is not None and len(conversations) >= limit:
            break
    if not conversations:
        raise GptkitError(f"{path} holds no conversations; expected one JSON object per line.")
    return conversations


def parse_conversation(record: Any, where: str) -> Conversation:
    """A record in OpenAI's shape ("messages") or ShareGPT's ("conversations"); other fields
    (an id, ...) are not part of the conversation, "task" names its metrics."""
    expected = ('an object with "messages" (OpenAI\'s shape: role and content) or '
                '"conversations" (ShareGPT\'s: from and value)')
    if not isinstance(record, dict):
        raise GptkitError(f"{where} is a JSON {_json_type(record)}; expected {expected}.")
    if "messages" in record:
        messages = check_messages(record["messages"], where)
    elif "conversations" in record:
        messages = check_messages(record["conversations"], where, sharegpt=True)
    else:
        raise GptkitError(f"{where} has neither 'messages' nor 'conversations'; expected "
                          f"{expected}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise GptkitError(f"{where} has no assistant turn; expected at least one (training's loss "
                          "and evaluation's scores fall on the assistant's turns).")
    task = record.get("task")
    if task is not None and not isinstance(task, str):
        raise GptkitError(f"{where}: field 'task' is a {_json_type(task)}; expected a task name.")
    return Conversation(messages, where, task)


def check_messages(value: Any, where: str, sharegpt: bool = False) -> list[Message]:
    """Messages as {"role", "content"} dicts; content may also be OpenAI's list of text parts."""
    field, role_key, text_key = (("conversations", "from", "value") if sharegpt
                                 else ("messages", "role", "content"))
    names = tuple(SHAREGPT_ROLES) if sharegpt else ROLES
    if not isinstance(value, list):
        raise GptkitError(f"{where}: '{field}' is a {_json_type(value)}; expected a list of "
                          "messages.")
    if not value:
        raise GptkitError(f"{where}: '{field}' is empty; expected at least one message.")
    messages = []
    for i, message in enumerate(value):
        at = f"{where}: {field}[{i}]"
        if not isinstance(message, dict):
            raise GptkitError(f"{at} is a JSON {_json_type(message)}; expected an object like "
                              f'{{"{role_key}": "{names[1]}", "{text_key}": "..."}}.')
        for key in message:
            if key not in (role_key, text_key):
                raise GptkitError(f"{at} has the unknown field '{key}'; expected {role_key} and "
                                  f"{text_key}.")
        role = message.get(role_key)
        if role not in names:
            raise GptkitError(f"{at}.{role_key} is {json.dumps(role, ensure_ascii=False)}; "
                              f"expected one of {', '.join(names)}.")
        if text_key not in message:
            raise GptkitError(f"{at} has no '{text_key}'; expected the message's text.")
        content = text_content(message[text_key])
        if content is None:
            raise GptkitError(f"{at}.{text_key} is a {_json_type(message[text_key])}; expected a "
                              "string.")
        messages.append({"role": SHAREGPT_ROLES[role] if sharegpt else role, "content": content})
    return messages


def text_content(value: Any) -> str | None:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
            isinstance(p, dict) and set(p) == {"type", "text"} and p["type"] == "text"
            and isinstance(p["text"], str) for p in value):
        return "".join(p["text"] for p in value)
    return None


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def write_conversation(messages: Sequence[Message]) -> str:
    """One JSONL line in the training shape (what `gptkit chat`'s /save writes)."""
    return json.dumps({"messages": [{"role": m["role"], "content": m["content"]}
                                    for m in messages]}, ensure_ascii=False) + "\n"


# -- the template ---------------------------------------------------------------------------

_spans: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar("gptkit_chat_spans",
                                                                       default=None)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """A Jinja template in transformers' environment: the sandbox, trim_blocks and
    lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, an unescaped `tojson`,
    and the {% generation %} tag, whose output's place in the text is recorded."""
    import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller: Any) -> str:
            text = caller()
            tracking = _spans.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise GptkitError(f"the model's chat template is not valid Jinja ({exc}).") from None


@dataclass(frozen=True)
class ChatFormat:
    """How one model's conversations become text: its Jinja template, or (None) the plain
    transcript. `variables` are the special tokens a template may use (bos_token, ...);
    `stop` the strings that end an answer besides the end-of-turn token."""

    template: str | None
    variables: tuple[tuple[str, str], ...] = ()

    @property
    def plain(self) -> bool:
        return self.template is None

    @property
    def stop(self) -> list[str]:
        return [PLAIN_STOP] if self.plain else []

    @property
    def has_generation_marks(self) -> bool:
        return self.template is not None and bool(_GENERATION_TAG.search(self.template))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False
               ) -> tuple[str, list[Span]]:
        """The text of `messages` and the character spans the assistant wrote."""
        if self.template is None:
            return _plain(messages, add_generation_prompt)
        import jinja2

        blocks: list[str] = []
        spans: list[Span] = []
        token = _spans.set((blocks, spans))
        try:
            for block in _compile(self.template).generate(
                    messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                    tools=None, documents=None, **dict(self.variables)):
                blocks.append(block)
        except jinja2.TemplateError as exc:
            raise GptkitError(f"the model's chat template refused the conversation: {exc}") from None
        finally:
            _spans.reset(token)
        return "".join(blocks), spans


def _plain(messages: Sequence[Message], add_generation_prompt: bool) -> tuple[str, list[Span]]:
    """The transcript of a model without a template: system text, a blank line, then
    "User: ..." and "Assistant: ..." lines; the assistant writes " text\\n"."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    text = system + "\n\n" if system else ""
    spans = []
    for message in messages:
        if message["role"] == "user":
            text += f"User: {message['content']}\n"
        elif message["role"] == "assistant":
            text += "Assistant:"
            spans.append((len(text), len(text) + len(message["content"]) + 2))
            text += f" {message['content']}\n"
    return text + ("Assistant:" if add_generation_prompt else ""), spans


def chat_format(tokenizer: Tokenizer) -> ChatFormat:
    """The format of a model whose tokenizer this is: its template, or the plain transcript."""
    variables = (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token),
                 ("pad_token", tokenizer.pad_token))
    return ChatFormat(tokenizer.chat_template, variables)


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Tokens that end an answer: the eos token (<|im_end|> for a chat model), <|im_end|>
    and end-of-text; what generation_config.json lists for transformers and vLLM."""
    ids = [tokenizer.eos_token_id, tokenizer.token_to_id(IM_END), tokenizer.pad_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def add_chat_tokens(tokenizer: Tokenizer) -> int:
    """Make a base tokenizer a ChatML one, in place: <|im_start|> and <|im_end|> as special
    tokens, <|im_end|> as eos (end-of-text stays padding), the template; for a character
    tokenizer also the characters of the turns' headers it lacks. Returns the tokens added;
    a tokenizer that has a template keeps it."""
    if tokenizer.chat_template is not None:
        if not chat_format(tokenizer).has_generation_marks:
            raise GptkitError("the model's chat template has no {% generation %} markers, so the "
                              "assistant's tokens cannot be told apart for the loss; remove "
                              "chat_template from its tokenizer files to fine-tune with ChatML.")
        return 0
    added = tokenizer.add_special_tokens([IM_START, IM_END])
    if tokenizer.kind == "char":
        header = "".join(sorted(set("".join(ROLES) + "\n")))
        added += tokenizer.add_tokens([c for c in header if tokenizer.count_unknown(c)])
    tokenizer.set_eos_token(IM_END)
    tokenizer.chat_template = CHATML_TEMPLATE
    return added


# -- token ids ------------------------------------------------------------------------------

def encode_conversation(tokenizer: Tokenizer, fmt: ChatFormat, messages: Sequence[Message]
                        ) -> Encoded:
    """Token ids of the rendered conversation and labels that keep only the tokens of the
    assistant's turns (transformers' rule: a token overlapping a generation span)."""
    text, spans = fmt.render(messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    return ids, assistant_labels(ids, offsets, spans)


def assistant_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[Span]
                     ) -> list[int]:
    """`ids` where a token's characters overlap one of `spans`, IGNORE_INDEX elsewhere."""
    import numpy as np

    from gptkit.kernels import IGNORE_INDEX  # here: the server imports this module before torch

    if not ids:
        return []
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    keep = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        keep |= (bounds[:, 1] > start) & (bounds[:, 0] < end)
    return np.where(keep, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()


def _check_asks(messages: Sequence[Message]) -> None:
    """Refuse a conversation to answer that does not end with the user's message (an
    answer to it is what is asked for), as the server does."""
    if not messages:
        raise GptkitError("the conversation has no messages; expected at least the user's "
                          "message to answer.")
    if messages[-1]["role"] != "user":
        raise GptkitError(f"the last message is from the {messages[-1]['role']}; expected the "
                          "user's message to answer.")


def prompt_ids(tokenizer: Tokenizer, fmt: ChatFormat, messages: Sequence[Message]) -> list[int]:
    """Token ids of the conversation followed by the start of the assistant's answer;
    the last message must be the user's."""
    _check_asks(messages)
    return tokenizer.encode(fmt.render(messages, add_generation_prompt=True)[0])


def shorter(messages: Sequence[Message]) -> Iterator[list[Message]]:
    """`messages` less ever more of their earliest exchanges (a user turn and what follows it
    up to the next user turn); system messages at the start stay."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    starts = [i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user"]
    for start in starts:
        yield [*messages[:head], *messages[start:]]


def fit_conversation(tokenizer: Tokenizer, fmt: ChatFormat, messages: Sequence[Message],
                     max_tokens: int) -> tuple[Encoded | None, int]:
    """The encoded conversation within `max_tokens`, dropping whole earliest exchanges as
    needed (at least one assistant turn must stay whole), and how many messages went;
    None when even the last exchange does not fit."""
    encoded = encode_conversation(tokenizer, fmt, messages)
    if len(encoded[0]) <= max_tokens:
        return encoded, 0
    for kept in shorter(messages):
        if not any(m["role"] == "assistant" for m in kept):
            break
        encoded = encode_conversation(tokenizer, fmt, kept)
        if len(encoded[0]) <= max_tokens:
            return encoded, len(messages) - len(kept)
    return None, len(messages)


def fit_prompt(tokenizer: Tokenizer, fmt: ChatFormat, messages: Sequence[Message],
               max_tokens: int) -> tuple[list[int], list[Message]] | None:
    """The prompt ids of `messages` (ending with the user's) within `max_tokens`, dropping
    earliest exchanges as needed, and the messages kept; None when even the last user turn
    does not fit."""
    for kept in [list(messages), *shorter(messages)]:
        ids = prompt_ids(tokenizer, fmt, kept)
        if len(ids) <= max_tokens:
            return ids, kept
    return None


def fit_chat(encode: Callable[[list[Message]], list[int]], messages: Sequence[Message],
             context: int, max_new_tokens: int) -> tuple[list[int], list[Message], int]:
    """The prompt ids for answering `messages` (ending with the user's), the messages kept
    and the answer's length limit: the earliest exchanges are dropped until the prompt
    leaves `max_new_tokens` of the `context`; when even the last user turn leaves less,
    the answer is shorter. `gptkit chat`, the server's /v1/chat/fit and so the playground
    all fit a conversation here, so a long chat goes on alike in each."""
    for room in (max_new_tokens, 1):
        for kept in [list(messages), *shorter(messages)]:
            ids = encode(kept)
            if len(ids) <= context - room:
                return ids, kept, min(max_new_tokens, context - len(ids))
    alone = len(encode(list(messages[-1:])))
    raise GptkitError(f"the message is {alone} tokens long with its template; the model's "
                      f"context of {context} tokens leaves no room to answer.")


def encode_conversations(tokenizer: Tokenizer, fmt: ChatFormat,
                         conversations: Sequence[Conversation], block_size: int, name: str,
                         progress: bool = True) -> list[Encoded]:
    """Every conversation encoded for a context of `block_size`, earliest exchanges dropped
    where one is too long; says how many were shortened or skipped."""
    encoded, shortened, skipped = [], 0, 0
    rendered = [fmt.render(c.messages) for c in conversations]
    tokens = tokenizer.encode_batch_with_offsets([text for text, _ in rendered])
    for conversation, (_, spans), (ids, offsets) in zip(conversations, rendered, tokens,
                                                        strict=True):
        if len(ids) <= block_size + 1:  # most conversations: whole, encoded in one batch
            encoded.append((ids, assistant_labels(ids, offsets, spans)))
            continue
        example, dropped = fit_conversation(tokenizer, fmt, conversation.messages, block_size + 1)
        if example is None:
            skipped += 1
            continue
        shortened += dropped > 0
        encoded.append(example)
    if (shortened or skipped) and progress:
        print(f"note: {shortened + skipped} of {len(conversations)} conversations in {name} are "
              f"longer than the context of {block_size} tokens: {shortened} lost their earliest "
              f"turns, {skipped} were skipped (their last exchange alone does not fit).",
              file=sys.stderr)
    if not encoded:
        raise GptkitError(f"no conversation of {name} fits the context of {block_size} tokens, "
                          "even with only its last exchange.")
    return encoded
