"""Tokenizers: byte-level BPE (GPT-2 style) and character-level, stored as `tokenizer.json`.

A `Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer`, which defines the file format
(`AutoTokenizer.from_pretrained(dir)` opens what `save_pretrained` writes) and serves as
the reference engine. For byte-level BPE whose ids are the merge ranks (GPT-2's own files
and every vocabulary `Tokenizer.train` makes), encoding runs on a `tiktoken.Encoding` built
from the same vocabulary: several times faster, and tested to give identical ids.

    tok = Tokenizer.train(["corpus.txt"], vocab_size=8192)
    tok.save_pretrained("tok/")
    ids = Tokenizer.from_pretrained("tok/").encode("Hello world")

`<|endoftext|>` is the end-of-text token and also serves as bos, pad and (for BPE) unk,
as in GPT-2. Written literally in a text, it is encoded as that special token, as Hugging
Face tokenizers do by default. A chat model's tokenizer (see `gptkit.conversation`) adds
`<|im_start|>` and `<|im_end|>`, names `<|im_end|>` its eos token and carries the Jinja
`chat_template`, saved in tokenizer_config.json and as chat_template.jinja.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tiktoken
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from gptkit.checkpoint import TOKENIZER_FILES, download
from gptkit.errors import GptkitError, read_json

if TYPE_CHECKING:
    import torch

EOT = "<|endoftext|>"
UNK = "<unk>"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
KINDS = ("bpe", "char")
# Files a tokenizer directory may hold; the hub download fetches only these.
_HUB_FILES = (*TOKENIZER_FILES, "encoder.json", "vocab.bpe")
# Bytes that were not valid UTF-8, as `surrogateescape` decodes them.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# Where a text can be cut without changing its GPT-2 pre-tokenization: before a single
# space between non-spaces ("a| b") or after a single newline between non-spaces ("a\n|b").
# Either side encoded alone then starts and ends pre-tokens exactly where the whole would.
_SAFE_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")
# model_max_length above this is Hugging Face's "unknown" sentinel (int(1e30)).
_NO_MAX_LENGTH = 10**12


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, the alphabet of byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8, each invalid byte becoming U+FFFD; return the text and that count."""
    try:
        return raw.decode("utf-8"), 0  # valid, the common case: one pass
    except UnicodeDecodeError:
        return _replace_escapes(raw.decode("utf-8", "surrogateescape"))


def _decode_piece(decoder: codecs.IncrementalDecoder, raw: bytes, final: bool
                  ) -> tuple[str, int]:
    """`decode_utf8` for the next piece of a stream: strict while the bytes are valid, then
    (from the first invalid byte on) with surrogateescape and the escapes replaced."""
    if decoder.errors == "strict":
        try:
            return decoder.decode(raw, final), 0
        except UnicodeDecodeError:  # the decoder keeps its state; decode again below
            decoder.errors = "surrogateescape"
    return _replace_escapes(decoder.decode(raw, final))


def _replace_escapes(text: str) -> tuple[str, int]:
    """Invalid bytes (decoded as lone surrogates) become U+FFFD; valid text, the common
    case, is recognised by one fast encode instead of a regex scan."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        return _ESCAPED_BYTE.subn("\ufffd", text)


def read_text_chunks(path: str | Path, chunk_bytes: int = 1 << 20) -> Iterator[tuple[str, int]]:
    """Yield `(text, bytes_read)` pieces of a UTF-8 file, in bounded memory.

    Pieces are cut where GPT-2 pre-tokenization does not change, so encoding them one by
    one gives the ids of the whole file (a run of over 16 chunks with no space or newline
    between non-space characters is cut anyway). Bytes that are not valid UTF-8 become
    U+FFFD and one warning per file gives their count.
    """
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path} does not exist or is not a file; expected a text file.")
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    replaced = 0
    carry = ""
    unreported = 0
    with path.open("rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            unreported += len(raw)
            text, n = _decode_piece(decoder, raw, final=not raw)
            replaced += n
            text = carry + text
            if not raw:
                break
            cut = _last_safe_cut(text)
            if cut <= 0 and len(text) > 16 * chunk_bytes:
                cut = len(text)
            if cut > 0:
                yield text[:cut], unreported
                unreported = 0
                carry = text[cut:]
            else:
                carry = text
    if text or unreported:
        yield text, unreported
    if replaced:
        warnings.warn(
            f"{path}: {replaced} bytes that are not valid UTF-8 were replaced with U+FFFD.",
            stacklevel=2,
        )


def _last_safe_cut(text: str) -> int:
    """Last index where `text` may be cut (see `_SAFE_CUT`), or -1."""
    window = 1 << 8  # prose has a cut every few characters; search back from the end
    while True:
        start = max(0, len(text) - window)
        last = -1
        for m in _SAFE_CUT.finditer(text, start):
            last = m.start()
        if last > 0 or start == 0:
            return last
        window *= 4  # geometric, so text without cut points costs linear time


def _check_text(text: str) -> None:
    """Refuse lone surrogates: they have no UTF-8 bytes, so no byte-level tokens."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _surrogate_error(text, e) from None


def _surrogate_error(text: str, error: UnicodeEncodeError) -> GptkitError:
    return GptkitError(
        f"text contains an unpaired surrogate {text[error.start]!r} at position "
        f"{error.start}; expected valid Unicode text."
    )


def _tiktoken_encoding(spec: dict[str, Any], eos_token: str) -> tiktoken.Encoding | None:
    """A tiktoken Encoding equal to this byte-level BPE, or None when ids could differ.

    tiktoken merges the adjacent pair whose concatenation has the lowest id, so the ids of
    merged tokens must follow merge order, every multi-byte token must come from a merge,
    and there must be nothing but the GPT-2 regex and byte mapping before the model.
    """
    model = spec["model"]
    pre = spec.get("pre_tokenizer") or {}
    if (
        model.get("type") != "BPE"
        or spec.get("normalizer")
        or pre.get("type") != "ByteLevel"
        or pre.get("add_prefix_space")
        or not pre.get("use_regex", True)
        or model.get("dropout")
        or model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        return None
    added = spec.get("added_tokens") or []
    if any(t["lstrip"] or t["rstrip"] or t["single_word"] for t in added):
        return None
    special = {t["content"]: t["id"] for t in added}
    if eos_token not in special:
        return None
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = {k: v for k, v in model["vocab"].items() if k not in special}
    if any(c not in vocab for c in byte_of):
        return None
    merged = set()
    last = -1
    for pair in model["merges"]:
        a, b = pair.split(" ") if isinstance(pair, str) else pair
        rank = vocab.get(a + b)
        if rank is None or rank <= last or a + b in merged:
            return None
        merged.add(a + b)
        last = rank
    if len(merged) + 256 != len(vocab):
        return None
    # Each byte-level character becomes the byte it stands for and any other character
    # U+FFFF, which latin-1 cannot encode: one C-level pass per token.
    to_bytes = {i: 0xFFFF for i in range(256)} | {ord(c): b for c, b in byte_of.items()}
    try:
        ranks = {tok.translate(to_bytes).encode("latin-1"): i for tok, i in vocab.items()}
    except UnicodeEncodeError:
        return None
    return tiktoken.Encoding(
        name="gptkit", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special
    )


def _detect_kind(spec: dict[str, Any]) -> str:
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GptkitError(
            f"tokenizer.json has a {model.get('type')} model; gptkit supports byte-level BPE "
            "and character-level tokenizers."
        )
    decoder = spec.get("decoder") or {}
    if not model.get("merges") and decoder.get("type") == "Fuse":
        return "char"
    return "bpe"


class Tokenizer:
    """Text to token ids and back; see the module docstring."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        eos_token: str = EOT,
        model_max_length: int | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        specials: dict[str, str] | None = None,
    ) -> None:
        self._backend = backend
        spec = json.loads(backend.to_str())
        self._kind = _detect_kind(spec)
        self._eos_token = eos_token
        # padding (and bos) stay end-of-text when a chat tokenizer's eos becomes <|im_end|>
        self._pad_token = pad_token or eos_token
        # bos/unk tokens of a tokenizer made elsewhere (an imported GGUF), kept when saved
        self._specials = dict(specials or {})
        self.model_max_length = model_max_length
        self.chat_template = chat_template  # a Jinja chat template (chat models), or None
        self._refresh(spec)

    def _refresh(self, spec: dict[str, Any] | None = None) -> None:
        """Derive ids, sizes and the fast engine from the backend (again, after adding
        tokens); `spec` is the backend's JSON, where the caller has it parsed already."""
        spec = spec if spec is not None else json.loads(self._backend.to_str())
        for name, token in (("end-of-text", self._eos_token), ("padding", self._pad_token)):
            if self._backend.token_to_id(token) is None:
                raise GptkitError(
                    f"the tokenizer has no {name} token {token!r}; expected it in its vocabulary."
                )
        self._eos_id = self._backend.token_to_id(self._eos_token)
        self._pad_id = self._backend.token_to_id(self._pad_token)
        self._vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        self._unk_id = self._backend.token_to_id(UNK) if self._kind == "char" else None
        self._fast = _tiktoken_encoding(spec, self._pad_token) if self._kind == "bpe" else None
        # what the tokenizer's post-processor puts before a text (a bos token, for the files
        # whose add_bos_token is set: Llama, Gemma); gptkit's own add nothing
        self._prefix = self._backend.encode("", add_special_tokens=True).ids
        self.__dict__.pop("hash", None)  # a cached hash of the old vocabulary

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        files: Sequence[str | Path] | None = None,
        *,
        texts: Iterable[str] | None = None,
        vocab_size: int = 8192,
        kind: str = "bpe",
    ) -> Tokenizer:
        """Learn a vocabulary from text files and/or an iterable of texts.

        `bpe` learns `vocab_size - 257` merges on top of the 256 bytes (ids 0-255 are the
        bytes, merges follow in order, `<|endoftext|>` is last), so ids are merge ranks and
        the fast engine applies. `char` keeps the `vocab_size - 2` most frequent
        characters, sorted, then `<|endoftext|>` and `<unk>`.
        """
        if kind not in KINDS:
            raise GptkitError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}.")
        if kind == "bpe" and vocab_size < 257:
            raise GptkitError(
                f"vocab_size {vocab_size} is too small for byte-level BPE; expected at least "
                "257 (256 bytes and <|endoftext|>)."
            )
        if kind == "char" and vocab_size < 3:
            raise GptkitError(f"vocab_size {vocab_size} is too small; expected at least 3.")
        if files is None and texts is None:
            raise GptkitError("no training text; pass files or texts.")
        for f in files or []:
            if not Path(f).is_file():
                raise GptkitError(f"training file {f} does not exist or is not a file.")
            if Path(f).stat().st_size == 0:
                raise GptkitError(f"training file {f} is empty; expected some text.")
        seen = [0]

        def all_texts() -> Iterator[str]:
            for f in files or []:
                for text, _ in read_text_chunks(f):
                    seen[0] += len(text)
                    yield text
            for text in texts or []:
                _check_text(text)
                seen[0] += len(text)
                yield text

        if kind == "bpe":
            tok = cls._train_bpe(all_texts(), vocab_size)
        else:
            tok = cls._train_char(all_texts(), vocab_size)
        if not seen[0]:
            raise GptkitError("the training text is empty; expected some text to learn from.")
        return tok

    @classmethod
    def _train_bpe(cls, texts: Iterator[str], vocab_size: int) -> Tokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 1,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        merges = [
            tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in json.loads(hf.to_str())["model"]["merges"]
        ]
        # Renumber: bytes first in byte order, then merges in the order they were learned.
        vocab = {c: b for b, c in bytes_to_unicode().items()}
        for a, b in merges:
            vocab.setdefault(a + b, len(vocab))
        return cls(_byte_level_backend(vocab, merges))

    @classmethod
    def _train_char(cls, texts: Iterator[str], vocab_size: int) -> Tokenizer:
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(text)
        kept = sorted(c for c, _ in counts.most_common(vocab_size - 2))
        vocab = {c: i for i, c in enumerate(kept)}
        vocab[EOT] = len(vocab)
        vocab[UNK] = len(vocab)
        # No pre-tokenizer and no merges: the BPE model maps each character to its id
        # (unknown ones to <unk>), and Fuse joins tokens back without spaces.
        hf = HFTokenizer(models.BPE(vocab, [], unk_token=UNK, fuse_unk=False))
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens([AddedToken(EOT, special=True), AddedToken(UNK, special=True)])
        return cls(hf)

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path) -> Tokenizer:
        """Load from a directory (tokenizer.json, vocab.json + merges.txt, or OpenAI's
        encoder.json + vocab.bpe), or download a Hugging Face hub name such as "gpt2"."""
        path = Path(name_or_dir)
        if not path.is_dir():
            if path.exists():
                raise GptkitError(f"{path} is a file; expected a tokenizer directory.")
            path = download(str(name_or_dir), _HUB_FILES,
                            "a local directory that holds tokenizer.json")
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            config = read_json(path / "tokenizer_config.json")
        eos = _token_text(config.get("eos_token"), EOT)
        pad = _token_text(config.get("pad_token"), eos)
        max_len = config.get("model_max_length")
        if not isinstance(max_len, int) or max_len > _NO_MAX_LENGTH:
            max_len = None
        if (path / "tokenizer.json").is_file():
            try:
                backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:
                raise GptkitError(
                    f"{path / 'tokenizer.json'} is not a valid tokenizer.json ({e})."
                ) from None
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            backend = _backend_from_files(path / "vocab.json", path / "merges.txt")
        elif (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
            backend = _backend_from_files(path / "encoder.json", path / "vocab.bpe")
        else:
            raise GptkitError(
                f"{path} holds no tokenizer; expected tokenizer.json, vocab.json + merges.txt, "
                "or encoder.json + vocab.bpe."
            )
        if backend.token_to_id(pad) is None:  # e.g. a pad token this engine does not keep
            pad = eos
        specials = {name: token for name in ("bos_token", "unk_token")
                    if backend.token_to_id(token := _token_text(config.get(name), "")) is not None}
        return cls(backend, eos_token=eos, model_max_length=max_len, pad_token=pad,
                   chat_template=_read_chat_template(path, config), specials=specials)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (and a chat
        model's chat_template.jinja), which `transformers.AutoTokenizer.from_pretrained(directory)`
        loads with the same ids and chat template."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        specials = {
            "bos_token": self.bos_token,
            "eos_token": self._eos_token,
            "unk_token": self._specials.get(
                "unk_token", UNK if self._kind == "char" else self._pad_token),
            "pad_token": self._pad_token,
        }
        config: dict[str, Any] = {
            "tokenizer_class": _transformers_class(json.loads(self._backend.to_str())),
            **specials,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            # both places: transformers before 4.43 reads the config, later ones the file
            config["chat_template"] = self.chat_template
            (directory / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
        for name, content in [
            ("tokenizer_config.json", config),
            ("special_tokens_map.json", specials),
        ]:
            (directory / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")

    # ---- properties ---------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """Either "bpe" (byte-level BPE) or "char" (one token per character)."""
        return self._kind

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._vocab_size

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    @property
    def pad_token(self) -> str:
        return self._pad_token

    @property
    def bos_token(self) -> str:
        """The token a text may start with (a chat template's bos_token): the file's own, or
        the padding token of a tokenizer that has none (gptkit's)."""
        return self._specials.get("bos_token", self._pad_token)

    @property
    def pad_token_id(self) -> int:
        """Padding reuses end-of-text, as GPT-2 users do; the attention mask hides it. (A chat
        tokenizer keeps it when its eos becomes the end-of-turn token.)"""
        return self._pad_id

    def token_to_id(self, token: str) -> int | None:
        """The id of one token of the vocabulary (special ones included), or None."""
        return self._backend.token_to_id(token)

    def set_eos_token(self, token: str) -> None:
        """Make `token` (already in the vocabulary) the eos token; padding keeps its token."""
        if self._backend.token_to_id(token) is None:
            raise GptkitError(f"{token!r} is not in the vocabulary; add it before naming it eos.")
        self._eos_token = token
        self._refresh()

    def add_special_tokens(self, tokens: Sequence[str]) -> int:
        """Add `tokens` as special tokens (never split, left out by skip_special_tokens) at
        the next free ids, as Hugging Face does; returns how many were new."""
        new = [t for t in tokens if self._backend.token_to_id(t) is None]
        self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                          for t in new])
        self._refresh()
        return len(new)

    def add_tokens(self, tokens: Sequence[str]) -> int:
        """Add ordinary tokens at the next free ids (a char tokenizer's missing characters);
        returns how many were new."""
        new = [t for t in tokens if self._backend.token_to_id(t) is None]
        self._backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in new])
        self._refresh()
        return len(new)

    @property
    def unk_token_id(self) -> int | None:
        """Id of `<unk>` for char tokenizers; None for byte-level BPE, which has no unknowns."""
        return self._unk_id

    @property
    def uses_tiktoken(self) -> bool:
        """True when encoding runs on the faster tiktoken engine."""
        return self._fast is not None

    @functools.cached_property
    def hash(self) -> str:
        """sha256 of the canonical tokenizer.json, to check a data dir matches a model."""
        canonical = json.dumps(
            json.loads(self._backend.to_str()), sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # ---- encoding -----------------------------------------------------------------------

    def encode(self, text: str, return_tensors: str | None = None) -> list[int] | torch.Tensor:
        """Ids of `text`; with return_tensors="pt", an int64 tensor of shape (1, T)."""
        _check_text(text)
        if self._fast is not None:
            ids = self._fast.encode(text, allowed_special="all")
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if return_tensors is None:
            return ids
        if return_tensors != "pt":
            raise GptkitError(f"return_tensors={return_tensors!r}; expected None or 'pt'.")
        import torch

        return torch.tensor([ids], dtype=torch.long)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt to continue: `encode`, after the bos token the tokenizer's file
        says a text starts with (as transformers' `tokenizer(text)` and llama.cpp add it),
        unless the text already starts with it (a chat template that writes bos_token)."""
        ids = self.encode(text)
        prefix = self._prefix
        return ids if not prefix or ids[:len(prefix)] == prefix else prefix + ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` and each token's (start, end) character span in it, from the
        tokenizers engine that `transformers` runs (what chat loss masks are computed from)."""
        _check_text(text)
        encoding = self._backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_batch_with_offsets(self, texts: list[str]
                                  ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """`encode_with_offsets` for many texts, in parallel."""
        for text in texts:
            _check_text(text)
        return [(e.ids, e.offsets)
                for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def encode_numpy(self, text: str) -> np.ndarray:
        """Ids of `text` as a uint32 array, without building a Python list on the fast path
        (what corpus preparation needs: it writes arrays, and lists hold the GIL). tiktoken
        refuses lone surrogates itself, which spares a UTF-8 pass over every text."""
        if self._fast is not None:
            try:
                return self._fast.encode_to_numpy(text, allowed_special="all")
            except UnicodeEncodeError as e:
                raise _surrogate_error(text, e) from None
        return np.asarray(self.encode(text), dtype=np.uint32)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Ids of many texts, in parallel. `num_threads` sizes the tiktoken engine's pool
        (default: all cores); the tokenizers engine always uses its own (RAYON_NUM_THREADS)."""
        for text in texts:
            _check_text(text)
        if self._fast is not None:
            return self._fast.encode_batch(
                texts, num_threads=num_threads or os.cpu_count() or 1, allowed_special="all"
            )
        encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def count_unknown(self, text: str) -> int:
        """How many characters of `text` a char tokenizer maps to `<unk>` (0 for BPE)."""
        if self._unk_id is None:
            return 0
        return self.encode(text).count(self._unk_id)  # type: ignore[union-attr]

    def __call__(
        self,
        texts: str | list[str],
        padding: bool = True,
        return_tensors: str | None = "pt",
    ) -> dict[str, Any]:
        """Hugging Face style batch: `input_ids` and `attention_mask`, padded on the LEFT
        with pad_token_id so every row's last token is its real last token (for generation)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        ids = self.encode_batch(batch)
        width = max((len(x) for x in ids), default=0)
        if padding:
            mask = [[0] * (width - len(x)) + [1] * len(x) for x in ids]
            ids = [[self.pad_token_id] * (width - len(x)) + x for x in ids]
        else:
            mask = [[1] * len(x) for x in ids]
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": mask}
        if return_tensors != "pt":
            raise GptkitError(f"return_tensors={return_tensors!r}; expected None or 'pt'.")
        if len({len(x) for x in ids}) > 1:
            raise GptkitError("texts have different lengths; pass padding=True for tensors.")
        import torch

        return {
            "input_ids": torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1),
            "attention_mask": torch.tensor(mask, dtype=torch.long).reshape(len(ids), -1),
        }

    # ---- decoding -----------------------------------------------------------------------

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of a list of ids or a 1-D tensor/array; byte sequences that are not
        complete UTF-8 (e.g. half an emoji) decode to U+FFFD."""
        if hasattr(ids, "tolist"):
            if getattr(ids, "ndim", 1) != 1:
                raise GptkitError(f"decode expects 1-D ids; got shape {tuple(ids.shape)}.")
            ids = ids.tolist()
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise GptkitError(
                f"token id {bad[0]} is outside the vocabulary (size {self._vocab_size})."
            )
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: Iterable[Sequence[int] | Any], skip_special_tokens: bool = False
    ) -> list[str]:
        """`decode` for each row (a list of lists, or a 2-D tensor)."""
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self._kind!r}, vocab_size={self._vocab_size})"


def _transformers_class(spec: dict[str, Any]) -> str:
    """The transformers class for a tokenizer.json: GPT2TokenizerFast puts GPT-2's own split
    and byte mapping back, so only a tokenizer that splits exactly so may name it; any
    other (digits apart, SentencePiece pieces) takes the file as it is."""
    pre = spec.get("pre_tokenizer") or {}
    gpt2 = (spec["model"].get("type") == "BPE" and spec["model"].get("merges")
            and not spec.get("normalizer") and not spec["model"].get("byte_fallback")
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space"))
    return "GPT2TokenizerFast" if gpt2 else "PreTrainedTokenizerFast"


def _token_text(value: Any, default: str) -> str:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict of older
    transformers versions."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else default


def _read_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """The chat template of a tokenizer directory: chat_template.jinja (transformers 4.43+),
    else tokenizer_config.json's `chat_template` (a string, or named templates: "default")."""
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise GptkitError(f"{path / 'tokenizer_config.json'}: chat_template must be a string.")
    return template


def _byte_level_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> HFTokenizer:
    """GPT-2's configuration: ByteLevel regex split without prefix space, BPE, ByteLevel
    decoding, `<|endoftext|>` special (kept at its id if the vocabulary has it, else last)."""
    hf = HFTokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOT, special=True, normalized=True)])
    return hf


def _backend_from_files(vocab_file: Path, merges_file: Path) -> HFTokenizer:
    vocab = read_json(vocab_file)
    if not isinstance(vocab, dict):
        raise GptkitError(f"{vocab_file} is not a JSON object mapping tokens to ids.")
    merges = []
    lines = merges_file.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise GptkitError(f"{merges_file} line {n}: expected two tokens separated by a space.")
        merges.append((pair[0], pair[1]))
    try:
        return _byte_level_backend(vocab, merges)
    except Exception as e:
        raise GptkitError(f"{vocab_file} and {merges_file} do not form a BPE ({e}).") from None
