"""The tokenizer between tokenizer.json and a GGUF file's tokenizer.ggml.* keys, both ways.

    tok = read_tokenizer(model_dir, n_vocab, config)   # tokenizer.json -> what llama.cpp reads
    add_tokenizer(writer, tok)                         # ... written with gguf.GGUFWriter
    files = tokenizer_files(fields, path)              # GGUF keys -> tokenizer.json & co.
    eos_ids = end_of_turn_ids(fields)                  # ... and the ids that end a turn

llama.cpp has two tokenizers that Hugging Face's `tokenizers` can express exactly:

- `gpt2`: byte-level BPE with merges; its `tokenizer.ggml.pre` names the regexes
  llama.cpp splits text with first (`PRE_TOKENIZERS`, taken from its src/llama-vocab.cpp).
  In tokenizers these are a Sequence of Split steps before the ByteLevel mapping.
- `llama`: SentencePiece pieces with scores; llama.cpp replaces spaces by ▁ (after a
  leading space with `add_space_prefix`), then repeatedly joins the adjacent pair whose
  joined piece has the highest score, and writes what is left unknown as <0xNN> byte
  tokens. In tokenizers this is a BPE with byte_fallback whose merges are every split of
  every piece into two pieces, best score first (as sentencepiece's own BPE behaves).

Both ways, what llama.cpp would tokenize differently is refused with one sentence: a
pre-tokenizer without a llama.cpp name, a normalizer, merges that llama.cpp's score order
would apply differently, a tokenizer model llama.cpp reads another way (bert, t5, rwkv).
Special tokens match llama.cpp's types: control (special), user-defined (added, not
special), unknown; `add_bos_token` is what the post-processor of tokenizer.json does, so
transformers' `encode` adds bos exactly when llama.cpp's `llama_tokenize` does with
add_special (gptkit's `Tokenizer.encode`, like add_special=false, adds nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
# GPT-2's split pattern: what a Hugging Face ByteLevel pre-tokenizer with use_regex applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Special tokens that end a chat turn, as llama.cpp itself recognises them by name.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|assistant_end|>")
SPACE = "\u2581"  # ▁, SentencePiece's stand-in for a space
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # SentencePiece's byte pieces
# gguf.TokenType values (llama.cpp's llama_token_type), without importing gguf here
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Types llama.cpp cuts out of a text before its model sees it, as tokenizers' added tokens.
ADDED_TYPES = (UNKNOWN, CONTROL, USER_DEFINED)
# A score is a float32 in the file: -rank is exact below 2**24 merges.
MAX_MERGES = 1 << 24


def read_json(path: Path) -> Any:
    """A JSON file, or one sentence saying it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptkitError(f"{path} is not valid JSON ({exc}).") from None


# -- the pre-tokenizers llama.cpp knows by name --------------------------------------------

# llama.cpp's regexes, as src/llama-vocab.cpp spells them (`(?i:...)` written out, since
# its std::regex has no inline flags); Oniguruma, which tokenizers uses, reads them alike.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_HF_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_REST = (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_QWEN2_REST = (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
           r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"


@dataclass(frozen=True)
class PreTokenizer:
    """The `tokenizer.ggml.pre` names under which llama.cpp splits text with the same
    regexes, in order (each splits the pieces the one before left; what no match covers is
    a piece too), and sets the same switches. Export writes the first name."""

    names: tuple[str, ...]
    splits: tuple[str, ...]
    # whole pieces that are tokens skip the merges (Llama 3's tokenizer.json says so too)
    ignore_merges: bool = False
    # llama.cpp's add_bos when the file has no tokenizer.ggml.add_bos_token
    add_bos: bool = False
    # the same splitting as Hugging Face files write it
    spellings: tuple[tuple[str, ...], ...] = ()

    @property
    def name(self) -> str:
        """The name export writes."""
        return self.names[0]

    def splits_like(self, splits: tuple[str, ...]) -> bool:
        """Whether a tokenizer.json splitting with these regexes splits as llama.cpp does."""
        return splits == self.splits or splits in self.spellings


# GPT2_PATTERN ends in `|\s+`, which llama.cpp's leaves out: whitespace no other branch
# takes is a piece of its own either way. `(?i:'s)` also takes "'ſ" (long s), which
# llama.cpp's [sS] does not: a difference nobody's text shows, so those files export.
# Names whose llama.cpp entry also changes token types (jina's <mask>) are left out.
_LLAMA3 = (_CONTRACTIONS + _LLAMA3_REST,)
_LLAMA3_HF = ((_HF_CONTRACTIONS + _LLAMA3_REST,),)
PRE_TOKENIZERS = (
    PreTokenizer(("gpt-2", "phi-2", "gigachat", "mpt", "olmo", "jais", "exaone4", "mellum",
                  "a.x-4.0", "trillion", "granite-docling"), (_GPT2,),
                 spellings=((GPT2_PATTERN,),)),
    PreTokenizer(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral",
                  "midm-2.0", "lfm2"), _LLAMA3, ignore_merges=True, add_bos=True,
                 spellings=_LLAMA3_HF),
    PreTokenizer(("dbrx", "smaug-bpe"), _LLAMA3, spellings=_LLAMA3_HF),
    PreTokenizer(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "kormo", "hunyuan"),
                 (_CONTRACTIONS + _QWEN2_REST,), spellings=((_HF_CONTRACTIONS + _QWEN2_REST,),)),
    # digits one by one, then GPT-2's pattern (tokenizers: Digits + ByteLevel)
    PreTokenizer(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                  "minerva-7b"), (r"\p{N}", _GPT2), spellings=((r"\p{N}", GPT2_PATTERN),)),
    PreTokenizer(("deepseek-coder",), ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")),
    PreTokenizer(("tekken",), (_TEKKEN,), ignore_merges=True, add_bos=True),
)


# -- export: tokenizer.json -> the GGUF keys ------------------------------------------------

@dataclass
class GGUFTokenizer:
    """What llama.cpp reads from a GGUF file's tokenizer.ggml.* keys."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]  # gguf.TokenType per id
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None
    chat_template: str | list[dict[str, str]] | None
    pre: str | None = None  # gpt2: the pre-tokenizer's name
    merges: list[str] = field(default_factory=list)  # gpt2: "a b", in rank order
    scores: list[float] = field(default_factory=list)  # llama: one per token
    add_space_prefix: bool = False  # llama: a space before the text
    unk_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False


def read_tokenizer(model_dir: Path, n_vocab: int, config: dict[str, Any]) -> GGUFTokenizer:
    """The directory's tokenizer as llama.cpp will hold it, or one sentence why it can't be."""
    path = model_dir / TOKENIZER_NAME
    if not path.is_file():
        raise GptkitError(f"{model_dir} has no {TOKENIZER_NAME}; the GGUF file must carry the "
                          "tokenizer, so export needs the tokenizer.json that gptkit and "
                          "transformers save with a model.")
    spec = read_json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GptkitError(f"{path} holds a {model.get('type')} tokenizer, which gptkit cannot "
                          "export to GGUF; expected byte-level or SentencePiece-style BPE.")
    if not model.get("merges") and (spec.get("decoder") or {}).get("type") == "Fuse":
        raise GptkitError(
            f"{path} is a character-level tokenizer, which llama.cpp cannot express exactly "
            "(its tokenizers work on bytes or SentencePiece pieces and would map unknown "
            "characters differently); train a byte-level BPE tokenizer (gptkit tokenizer "
            "train --kind bpe) to export a model to GGUF.")
    sentencepiece = bool(model.get("byte_fallback"))
    problem = _sentencepiece_problem(spec) if sentencepiece else _bpe_problem(spec)
    if problem:
        kind = "SentencePiece" if sentencepiece else "BPE"
        raise GptkitError(f"{path} {problem}, which llama.cpp's {kind} tokenizer cannot "
                          "express exactly, so the model is not exported.")
    tokens, types = _token_table(spec, n_vocab, path)
    tok = GGUFTokenizer(model="llama" if sentencepiece else "gpt2", tokens=tokens, types=types,
                        bos_id=None, eos_id=None, eot_id=None, pad_id=None, chat_template=None)
    if sentencepiece:
        tok.scores = _scores(spec, tokens, types, path)
        tok.add_space_prefix = _space_prefix(spec) is True
        tok.unk_id = tokens.index(model["unk_token"]) if model.get("unk_token") in tokens \
            else None
    else:
        tok.pre = _pre_name(spec, path)
        tok.merges = _merge_list(model, path)
    _special_ids(tok, spec, model_dir, config)
    return tok


def _bpe_problem(spec: dict[str, Any]) -> str | None:
    """Why a BPE tokenizer.json differs from what llama.cpp's byte-level BPE does, or None."""
    model = spec["model"]
    if spec.get("normalizer"):
        return f"normalizes text first ({_describe(spec['normalizer'])})"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"sets the BPE option {key}={model[key]!r}"
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        return f"decodes with {_describe(decoder) or 'no decoder'} instead of ByteLevel"
    return _added_problem(spec, sentencepiece=False)


def _sentencepiece_problem(spec: dict[str, Any]) -> str | None:
    """Why a byte-fallback BPE tokenizer.json differs from llama.cpp's SentencePiece
    tokenizer, or None."""
    model = spec["model"]
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges"):
        if model.get(key):
            return f"sets the BPE option {key}={model[key]!r}"
    prefix = _space_prefix(spec)
    if prefix is None:
        return ("replaces spaces in a way other than llama.cpp's (normalizer "
                f"{_describe(spec.get('normalizer')) or 'none'}, pre-tokenizer "
                f"{_describe(spec.get('pre_tokenizer')) or 'none'})")
    if _decoder_steps(spec.get("decoder")) != _decoder_steps(_spm_decoder_json(prefix)):
        return (f"decodes with {_describe(spec.get('decoder')) or 'no decoder'} instead of "
                "Replace, ByteFallback, Fuse" + (", Strip" if prefix else ""))
    missing = [t for t in BYTE_TOKENS if t not in model["vocab"]]
    if missing:
        return f"lacks the byte token {missing[0]} that byte fallback needs"
    return _added_problem(spec, sentencepiece=True)


def _added_problem(spec: dict[str, Any], sentencepiece: bool) -> str | None:
    """llama.cpp finds added tokens in the raw text, whole and without stripping spaces."""
    for added in spec.get("added_tokens") or []:
        flags = [f for f in ("lstrip", "rstrip", "single_word") if added.get(f)]
        if flags:
            return f"has the added token {added['content']!r} with {', '.join(flags)}"
        if sentencepiece and added.get("normalized") and (" " in added["content"]
                                                          or SPACE in added["content"]):
            return (f"has the added token {added['content']!r}, matched after spaces "
                    "become ▁")
    return None


def _space_prefix(spec: dict[str, Any]) -> bool | None:
    """Whether a SentencePiece-style tokenizer.json puts ▁ before every text (True), only
    turns spaces into ▁ (False), or does something llama.cpp does not (None). llama.cpp's
    add_space_prefix is the normalizer Prepend("▁") + Replace(" ", "▁"), applied to each
    text between added tokens; Metaspace's "first"/"always" differ on a leading space.
    Gemma's split at " " after that normalizer finds no space, so it changes nothing."""
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    steps = (normalizer.get("normalizers") if (normalizer or {}).get("type") == "Sequence"
             else [normalizer] if normalizer else [])
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    prepend = {"type": "Prepend", "prepend": SPACE}
    spaces_kept = pre is None or (pre.get("type") == "Split"
                                  and pre.get("pattern") == {"String": " "})
    if spaces_kept and steps == [prepend, replace]:
        return True
    if spaces_kept and steps == [replace]:
        return False
    if not steps and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE \
            and pre.get("prepend_scheme") == "never" and not pre.get("split"):
        return False
    return None


def _spm_decoder_json(prefix: bool) -> dict[str, Any]:
    """The decoder that decodes SentencePiece pieces as llama.cpp does."""
    steps: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:  # llama.cpp drops the space it added before the first token
        steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"type": "Sequence", "decoders": steps}


def _decoder_steps(decoder: dict[str, Any] | None) -> list[tuple[Any, ...]] | None:
    """A decoder as comparable steps (type and the parameters that change the text)."""
    if not decoder or decoder.get("type") != "Sequence":
        return None
    return [(d.get("type"), json.dumps(d.get("pattern")), d.get("content"), d.get("start"),
             d.get("stop")) for d in decoder.get("decoders") or []]


def _splits(pre: dict[str, Any] | None) -> tuple[str, ...] | None:
    """The regexes a Hugging Face byte-level pre-tokenizer splits with, in order, or None
    when it does something else (a prefix space, a split that drops or merges text)."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" \
        else [pre] if pre else []
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    splits = []
    for step in steps[:-1]:
        if step.get("type") == "Digits":
            splits.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif (step.get("type") == "Split" and step.get("behavior") == "Isolated"
              and not step.get("invert") and "Regex" in (step.get("pattern") or {})):
            splits.append(step["pattern"]["Regex"])
        else:
            return None
    if steps[-1].get("use_regex", True):
        splits.append(GPT2_PATTERN)
    return tuple(splits)


def _pre_name(spec: dict[str, Any], path: Path) -> str:
    """llama.cpp's name for the way the tokenizer.json splits text and treats merges."""
    splits = _splits(spec.get("pre_tokenizer"))
    alike = [p for p in PRE_TOKENIZERS if splits and p.splits_like(splits)]
    if not alike:
        raise GptkitError(
            f"{path} splits text with a pre-tokenizer llama.cpp has no name for "
            f"({_describe(spec.get('pre_tokenizer'))}), so llama.cpp would tokenize "
            "differently; the model is not exported.")
    ignore = bool(spec["model"].get("ignore_merges"))
    pre = next((p for p in alike if p.ignore_merges == ignore), None)
    if pre is None:
        raise GptkitError(
            f"{path} sets ignore_merges={ignore}, but llama.cpp's '{alike[0].name}' "
            "pre-tokenizer, the one that splits text as it does, "
            f"{'ignores' if alike[0].ignore_merges else 'applies'} the merges to pieces that "
            "are tokens, so llama.cpp would tokenize differently; the model is not exported.")
    return pre.name


def _describe(part: Any) -> str:
    """A normalizer, pre-tokenizer or decoder named in a refusal ("Sequence of Split, ...")."""
    if not isinstance(part, dict):
        return ""
    if part.get("type") == "Sequence":
        inner = (part.get("pretokenizers") or part.get("normalizers")
                 or part.get("decoders") or [])
        return "Sequence of " + ", ".join(_describe(p) for p in inner)
    return str(part.get("type"))


def _token_table(spec: dict[str, Any], n_vocab: int, path: Path
                 ) -> tuple[list[str], list[int]]:
    """Every id's token text and llama.cpp type, one per embedding row."""
    sentencepiece = bool(spec["model"].get("byte_fallback"))
    unk = spec["model"].get("unk_token") if sentencepiece else None
    by_id: dict[int, tuple[str, int]] = {}
    for token, index in spec["model"]["vocab"].items():
        kind = NORMAL
        if sentencepiece and token in BYTE_TOKENS:
            kind = BYTE
        elif token == unk:
            kind = UNKNOWN
        by_id[index] = (token, kind)
    for added in spec.get("added_tokens") or []:
        kind = CONTROL if added.get("special") else USER_DEFINED
        if added["content"] == unk:
            kind = UNKNOWN
        by_id[added["id"]] = (added["content"], kind)
    n_tokens = max(by_id) + 1 if by_id else 0
    if n_tokens > n_vocab:
        raise GptkitError(f"{path} has {n_tokens} tokens but the model's embedding has only "
                          f"{n_vocab} rows; expected a tokenizer that fits the model.")
    # Rows the tokenizer never produces (a vocabulary padded for speed) become unused tokens,
    # as llama.cpp needs one token per embedding row.
    table = [by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(n_vocab)]
    if len({t for t, _ in table}) != n_vocab:
        raise GptkitError(f"{path} gives one token text to two ids; expected distinct tokens.")
    return [t for t, _ in table], [k for _, k in table]


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    """The merges of a BPE, as tokenizers writes them in either format ("a b" or [a, b])."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)  # type: ignore[misc]
            for m in model.get("merges") or []]


def _merge_list(model: dict[str, Any], path: Path) -> list[str]:
    """The merges as a GGUF list ("a b")."""
    merges = []
    for a, b in _merge_pairs(model):
        if " " in a or " " in b:  # llama.cpp splits each merge at its first space
            raise GptkitError(f"{path} has a merge of tokens that contain spaces ({a!r} + "
                              f"{b!r}), which a GGUF merge list cannot hold.")
        merges.append(f"{a} {b}")
    return merges


def _scores(spec: dict[str, Any], tokens: list[str], types: list[int], path: Path
            ) -> list[float]:
    """Scores under which llama.cpp's SentencePiece merging (best-scored joined piece first)
    makes the merges of tokenizer.json in their order: a merged token scores minus the rank
    of its first merge. That needs every two pieces that join into a token to be one of
    the merges, and the merges of one token to be adjacent; otherwise one sentence."""
    merges = _merge_pairs(spec["model"])
    if len(merges) >= MAX_MERGES:
        raise GptkitError(f"{path} has {len(merges)} merges; a GGUF score (float32) ranks at "
                          f"most {MAX_MERGES} exactly.")
    first: dict[str, int] = {}
    previous = None
    for rank, (a, b) in enumerate(merges):
        joined = a + b
        if joined in first and joined != previous:
            raise GptkitError(
                f"{path} merges into {joined!r} at ranks {first[joined]} and {rank} with "
                "other merges between, which llama.cpp's SentencePiece tokenizer (one score "
                "per token) cannot order the same way, so the model is not exported.")
        first.setdefault(joined, rank)
        previous = joined
    pairs = set(merges)
    pieces = _joinable(tokens, types)
    for token in pieces:
        for left, right in _halves(token, pieces):
            if (left, right) not in pairs:
                raise GptkitError(
                    f"{path} has no merge ({left!r}, {right!r}), but llama.cpp's "
                    f"SentencePiece tokenizer joins those two pieces into {token!r} wherever "
                    "they meet, so it would tokenize differently; the model is not exported.")
    # A token no merge makes is never the result of a join, so its score is never compared.
    return [float(-first[t]) if t in first else 0.0 for t in tokens]


def _joinable(tokens: list[str], types: list[int]) -> set[str]:
    """The tokens llama.cpp's SentencePiece merging can meet: added tokens are cut out of
    the raw text first, so only those with a ▁ (which only the escaped text has) can."""
    return {t for t, kind in zip(tokens, types, strict=True)
            if kind not in ADDED_TYPES or SPACE in t}


def _halves(token: str, pieces: set[str]) -> list[tuple[str, str]]:
    """Every split of `token` into two parts that can each be a symbol of llama.cpp's
    SentencePiece tokenizer: a piece, or a single character (where it starts)."""
    return [(token[:k], token[k:]) for k in range(1, len(token))
            if (k == 1 or token[:k] in pieces) and (k == len(token) - 1 or token[k:] in pieces)]


def _special_ids(tok: GGUFTokenizer, spec: dict[str, Any], model_dir: Path,
                 config: dict[str, Any]) -> None:
    """bos/eos/pad/end-of-turn ids, whether bos/eos go around a text, the chat template."""
    ids = {text: i for i, text in enumerate(tok.tokens)}
    tok_config = read_json(model_dir / TOKENIZER_CONFIG_NAME) \
        if (model_dir / TOKENIZER_CONFIG_NAME).is_file() else {}

    def token_id(name: str, config_field: str) -> int | None:
        value = tok_config.get(name)
        if isinstance(value, dict):  # older transformers save AddedToken dicts
            value = value.get("content")
        if isinstance(value, str) and value in ids:
            return ids[value]
        value = config.get(config_field)
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, int) and 0 <= value < len(tok.tokens) else None

    eos = token_id("eos_token", "eos_token_id")
    if eos is None and "<|endoftext|>" in ids:
        eos = ids["<|endoftext|>"]
    bos = token_id("bos_token", "bos_token_id")
    pad = token_id("pad_token", "pad_token_id")
    before, after = _template_ends(spec.get("post_processor"), ids, model_dir / TOKENIZER_NAME)
    tok.add_bos, tok.add_eos = before is not None, after is not None
    tok.bos_id = before if before is not None else bos if bos is not None else eos
    tok.eos_id = after if after is not None else eos
    tok.pad_id = pad if pad is not None else eos
    tok.eot_id = next((ids[t] for t in END_OF_TURN_TOKENS
                       if t in ids and tok.types[ids[t]] == CONTROL), None)
    template: Any = tok_config.get("chat_template")
    if (model_dir / CHAT_TEMPLATE_NAME).is_file():
        template = (model_dir / CHAT_TEMPLATE_NAME).read_text(encoding="utf-8")
    tok.chat_template = template or None


def _template_ends(post: dict[str, Any] | None, ids: dict[str, int], path: Path
                   ) -> tuple[int | None, int | None]:
    """The ids a TemplateProcessing post-processor puts before and after a single text
    (None, None without one): llama.cpp's add_bos and add_eos."""
    steps = (post or {}).get("processors") if (post or {}).get("type") == "Sequence" \
        else [post] if post else []
    template = next((s for s in steps if s.get("type") == "TemplateProcessing"), None)
    if template is None:
        return None, None
    single = [next(iter(piece.values())).get("id") for piece in template.get("single") or []]
    at = single.index("A") if "A" in single else -1
    if at not in (0, 1) or len(single) - at > 2:
        raise GptkitError(f"{path} adds {single} around a text (its post-processor), which "
                          "llama.cpp cannot: it adds at most a bos before and an eos after.")
    before = ids.get(single[0]) if at == 1 else None
    after = ids.get(single[-1]) if len(single) - at == 2 else None
    return before, after


def add_tokenizer(writer: Any, tok: GGUFTokenizer) -> None:
    """The tokenizer.ggml.* keys (and the chat template) of `tok`."""
    writer.add_tokenizer_model(tok.model)
    if tok.model == "gpt2":
        writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.types)
    if tok.model == "gpt2":
        writer.add_token_merges(tok.merges)
    else:
        writer.add_token_scores(tok.scores)
        writer.add_add_space_prefix(tok.add_space_prefix)
    for add, value in ((writer.add_bos_token_id, tok.bos_id),
                       (writer.add_eos_token_id, tok.eos_id),
                       (writer.add_unk_token_id, tok.unk_id),
                       (writer.add_eot_token_id, tok.eot_id),
                       (writer.add_pad_token_id, tok.pad_id)):
        if value is not None:
            add(value)
    # bos/eos around a text exactly when tokenizer.json's post-processor adds them (gptkit's
    # own tokenizers add nothing, so llama.cpp must not either)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(tok.add_eos)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


# -- import: the GGUF keys -> tokenizer.json ------------------------------------------------

def tokenizer_files(fields: dict[str, Any], path: Path) -> dict[str, Any]:
    """tokenizer.json (rebuilt from the GGUF vocabulary), tokenizer_config.json and, with a
    chat template, chat_template.jinja: file name -> text or JSON object. `fields` are the
    file's keys and values; `path` names the file in the one sentence of a refusal."""
    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens") or []
    types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if model == "gpt2":
        hf = _byte_level_tokenizer(fields, tokens, types, path)
    elif model == "llama":
        # llama.cpp's ids for a SentencePiece file that names none
        fields = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                  "tokenizer.ggml.unknown_token_id": 0, **fields}
        hf = _sentencepiece_tokenizer(fields, tokens, types)
    else:
        raise GptkitError(f"{path} has a {model!r} tokenizer, which gptkit cannot rebuild; it "
                          "reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) ones.")
    _add_special_tokens(hf, tokens, types, byte_level=model == "gpt2")
    bos, eos = _token(fields, tokens, "bos"), _token(fields, tokens, "eos")
    add_bos, add_eos = _adds(fields)
    hf.post_processor = _post_processor(bos if add_bos else None, eos if add_eos else None,
                                        tokens, byte_level=model == "gpt2")
    _check_ids(hf, tokens, types, path)

    config = _tokenizer_config(fields, tokens, model)
    files: dict[str, Any] = {TOKENIZER_NAME: hf.to_str(pretty=True) + "\n",
                             TOKENIZER_CONFIG_NAME: config}
    template = fields.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
        files[CHAT_TEMPLATE_NAME] = template
    return files


def end_of_turn_ids(fields: dict[str, Any]) -> list[int]:
    """The ids that end a chat turn besides eos, for generation_config.json's eos_token_id:
    tokenizer.ggml.eot_token_id, or else the END_OF_TURN_TOKENS the vocabulary has."""
    tokens = fields.get("tokenizer.ggml.tokens") or []
    eot = fields.get("tokenizer.ggml.eot_token_id")
    if isinstance(eot, int) and 0 <= eot < len(tokens):
        return [eot]
    return [tokens.index(t) for t in END_OF_TURN_TOKENS if t in tokens]


def _pre_tokenizer(name: Any, path: Path) -> PreTokenizer:
    """The table entry of a `tokenizer.ggml.pre` name, or one sentence naming the known."""
    pre = next((p for p in PRE_TOKENIZERS if name in p.names), None)
    if pre is None:
        known = ", ".join(n for p in PRE_TOKENIZERS for n in p.names)
        raise GptkitError(f"{path} has the pre-tokenizer {name!r}, which gptkit does not know; "
                          f"it knows {known}.")
    return pre


def _byte_level_tokenizer(fields: dict[str, Any], tokens: list[str], types: list[int],
                          path: Path) -> Any:
    """llama.cpp's `gpt2` tokenizer: its merges, split by its pre-tokenizer's regexes."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pre = _pre_tokenizer(fields.get("tokenizer.ggml.pre"), path)
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    # Added tokens after the last BPE token stay out of the BPE vocabulary and are appended
    # by add_special_tokens, as `Tokenizer.train` builds them: the same tokenizer.json, so
    # the same `Tokenizer.hash`, and prepared data still matches the imported model.
    last_normal = max((i for i, kind in enumerate(types) if kind == NORMAL), default=-1)
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
             if kind != UNUSED and (kind == NORMAL or i < last_normal)}
    hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    if pre.splits == (_GPT2,):  # as gptkit's own tokenizers write it
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_tokenizer(fields: dict[str, Any], tokens: list[str], types: list[int]
                             ) -> Any:
    """llama.cpp's `llama` tokenizer as a byte-fallback BPE (see the module docstring)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    unk = _token(fields, tokens, "unknown") or "<unk>"
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                                _merges_from_scores(tokens, types, scores),
                                unk_token=unk if unk in tokens else None, fuse_unk=True,
                                byte_fallback=True))
    replace = normalizers.Replace(" ", SPACE)
    prefix = fields.get("tokenizer.ggml.add_space_prefix", True)  # llama.cpp's default
    hf.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace] if prefix
                                         else [replace])
    hf.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return hf


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float]
                        ) -> list[tuple[str, str]]:
    """Every split of every piece llama.cpp can join into two such pieces, best-scored
    piece first (ties: lower id, then the longer left part): tokenizers' BPE then joins the
    pair llama.cpp joins."""
    pieces = _joinable(tokens, types)
    ranked = []
    for index, token in enumerate(tokens):
        if token not in pieces:
            continue
        for left, right in _halves(token, pieces):
            if left in pieces and right in pieces:  # a lone unknown character cannot join
                ranked.append((-scores[index], index, -len(left), left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(hf: Any, tokens: list[str], types: list[int], byte_level: bool
                        ) -> None:
    """Control and unknown tokens as special added tokens, user-defined ones as added
    tokens: llama.cpp cuts all of them out of a text first, as tokenizers does. In id order,
    so that those outside the BPE vocabulary get their ids."""
    from itertools import groupby

    from tokenizers import AddedToken

    added = [(t, kind == USER_DEFINED) for t, kind in zip(tokens, types, strict=True)
             if kind in ADDED_TYPES]
    for plain, run in groupby(added, key=lambda item: item[1]):
        # byte-level BPE has no normalizer, so `normalized` changes nothing there; True is
        # what gptkit's own tokenizers write (the same tokenizer.json comes back)
        batch = [AddedToken(t, special=not plain, normalized=byte_level) for t, _ in run]
        if plain:
            hf.add_tokens(batch)
        else:
            hf.add_special_tokens(batch)


def _adds(fields: dict[str, Any]) -> tuple[bool, bool]:
    """Whether llama.cpp adds bos / eos around a text: the file's keys, else its defaults
    (SentencePiece adds bos; a byte-level BPE only for some pre-tokenizers)."""
    if fields.get("tokenizer.ggml.model") == "llama":
        default_bos = True
    else:
        pre = next((p for p in PRE_TOKENIZERS if fields.get("tokenizer.ggml.pre") in p.names),
                   None)
        default_bos = bool(pre and pre.add_bos)
    return (bool(fields.get("tokenizer.ggml.add_bos_token", default_bos)),
            bool(fields.get("tokenizer.ggml.add_eos_token", False)))


def _post_processor(bos: str | None, eos: str | None, tokens: list[str], byte_level: bool
                    ) -> Any:
    """bos before / eos after each text when llama.cpp adds them (after ByteLevel's offset
    fixing for byte-level BPE)."""
    from tokenizers import processors

    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    if bos is not None or eos is not None:
        ends = [t for t in (bos, eos) if t is not None]
        first, last = [bos] if bos else [], [eos] if eos else []
        steps.append(processors.TemplateProcessing(
            single=[*first, "$A", *last], pair=[*first, "$A", *last, *first, "$B:1", *last],
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(ends)]))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)


def _token(fields: dict[str, Any], tokens: list[str], name: str) -> str | None:
    """The text of tokenizer.ggml.<name>_token_id, or None when the file has no such id."""
    index = fields.get(f"tokenizer.ggml.{name}_token_id")
    return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None


def _check_ids(hf: Any, tokens: list[str], types: list[int], path: Path) -> None:
    """Every token keeps its id: a model's embedding rows are indexed by them."""
    for index, (text, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != UNUSED and hf.token_to_id(text) != index:
            raise GptkitError(f"{path}: token {text!r} would not keep its id {index} in a "
                              "tokenizer.json (the vocabulary has it twice, or an added token "
                              "after unused ones).")


def _tokenizer_config(fields: dict[str, Any], tokens: list[str], model: str
                      ) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens, and a class that takes tokenizer.json as
    it is (bos/eos around a text come from its post-processor)."""
    eos = _token(fields, tokens, "eos")
    gpt2_split = model == "gpt2" and fields.get("tokenizer.ggml.pre") in PRE_TOKENIZERS[0].names
    config: dict[str, Any] = {
        # transformers' GPT2TokenizerFast would put GPT-2's own split back
        "tokenizer_class": "GPT2TokenizerFast" if gpt2_split else "PreTrainedTokenizerFast",
        "bos_token": _token(fields, tokens, "bos") or eos, "eos_token": eos,
        "unk_token": _token(fields, tokens, "unknown") or eos,
        "pad_token": _token(fields, tokens, "padding") or eos,
        "clean_up_tokenization_spaces": False,
    }
    if model == "gpt2":
        config["add_prefix_space"] = False
    context = next((v for k, v in fields.items() if k.endswith(".context_length")), None)
    if isinstance(context, int):
        config["model_max_length"] = context
    return config
