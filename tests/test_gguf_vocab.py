"""The GGUF tokenizer both ways (gptkit.export.gguf_vocab), checked against a real llama.cpp.

Import: the tokenizer.json rebuilt from a GGUF file's tokenizer.ggml.* keys must give
llama.cpp's own token ids, in gptkit's `Tokenizer` and in transformers' `AutoTokenizer`:
on SmolLM2 as llama.cpp's convert_hf_to_gguf.py wrote it (byte-level BPE, pre-tokenizer
'smollm'; the `smollm2_gguf` fixture), on a tiny vocabulary under every pre-tokenizer name
gptkit knows, and on SentencePiece-style (`llama`) vocabularies whose scores, shuffled,
say nothing about any merge order, with control, user-defined, unused and byte tokens.
Export: a SentencePiece-style tokenizer.json (byte fallback and ▁, as Gemma 3's and Llama
2's are) and byte-level ones split as Llama 3, Qwen2 and SmolLM split must give llama.cpp
the ids the tokenizers engine gives. The GGUF files for the tiny vocabularies hold a
one-layer llama with random weights: llama.cpp reads the tokenizer with any weights.
One run of tests/llamacpp/llamacpp.mjs answers for all of them (SmolLM2's file in a second
run), tokenizing each text (parsing special tokens, adding no bos) and decoding gptkit's ids.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from test_export_gguf import run_llamacpp
from tokenizers import Tokenizer as HFTokenizer

from gptkit import GPT, GPTConfig, Tokenizer
from gptkit.errors import GptkitError
from gptkit.export.gguf_vocab import (
    BYTE_TOKENS,
    PRE_TOKENIZERS,
    SPACE,
    GGUFTokenizer,
    add_tokenizer,
    end_of_turn_ids,
    read_tokenizer,
    tokenizer_files,
)

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "敏捷的棕色狐狸跳过了懒狗。你好，世界！ 日本語のテキスト、한국어텍스트",
    "Ship it 🚀🎉 👩‍💻 ✨ done",
    "def fib(n):\n\treturn n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint({'a': [1, 2.5e-3]})\n",
    "a  b   c\n\n\n  d\t\te \r\n   \u3000 end   ",
    "x=12345.678 ÀÉÎõü naïve café 1st 2nd ١٢٣ ½ 1,000,000",
    "It's here, isn't it? They'll say WE'RE done . I'M sure 'S",
    "    indented\n        more\n",
    " leading space, two:  x",
    "Привет мир, Ελληνικά, עברית, हिन्दी e\u0301te\u0301",
    "HelloWorld ÉCOLE école XMLHttpRequest path/to/file.txt ...!!! a--b __init__",
    "line1\r\nline2\rline3\n\n\nline4 \n \n",
    "aaaaaaa bbbbb ththth theethe ====== ------",
    "",
]
SMOLLM2_TEXTS = [*TEXTS, "<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n",
                 "<|endoftext|>a<|im_end|><|im_end|>b"]
# Added to the SentencePiece-style vocabularies: control tokens, a user-defined one
CONTROL_TOKENS = ("<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>")
USER_TOKEN = "<tool>"
USER_DEFINED, UNUSED = 4, 5  # gguf.TokenType
SPM_TEXTS = [*TEXTS, "<s>Hello</s> <start_of_turn>user\nhi<end_of_turn>\n<tool>x <tool> y",
             "<unk> <0x41> ▁▁ ▁x", "the thee then there their them"]


# -- writing GGUF files -----------------------------------------------------------------

def tiny_gguf(path: Path, tok: GGUFTokenizer) -> Path:
    """A one-layer llama (8 wide, random f32 weights) with `tok` as its tokenizer."""
    import gguf
    import numpy as np

    n_vocab, width, ffn = len(tok.tokens), 8, 16
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(width)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    add_tokenizer(writer, tok)
    shapes = {"token_embd.weight": (n_vocab, width), "output_norm.weight": (width,),
              "blk.0.attn_norm.weight": (width,), "blk.0.ffn_norm.weight": (width,),
              "blk.0.ffn_gate.weight": (ffn, width), "blk.0.ffn_up.weight": (ffn, width),
              "blk.0.ffn_down.weight": (width, ffn)}
    shapes |= {f"blk.0.attn_{x}.weight": (width, width) for x in ("q", "k", "v", "output")}
    generator = np.random.default_rng(0)
    for name, shape in shapes.items():
        writer.add_tensor(name, generator.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_fields(path: Path) -> dict[str, Any]:
    """A GGUF file's keys and values, as gguf_import reads them."""
    from gguf import GGUFReader

    values = {}
    for name, field in GGUFReader(path).fields.items():
        value = field.contents()
        values[name] = value.tolist() if hasattr(value, "tolist") else value
    return values


def imported(path: Path, out: Path, fields: dict[str, Any] | None = None) -> Path:
    """The tokenizer files `tokenizer_files` rebuilds from the GGUF file `path` (whose
    `fields` may be read already), in `out`."""
    out.mkdir(parents=True)
    for name, content in tokenizer_files(fields or gguf_fields(path), path).items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2)
        (out / name).write_text(text, encoding="utf-8")
    return out


# -- the vocabularies -----------------------------------------------------------------

def training_text() -> str:
    """Tiny Shakespeare's start and the test texts (so that CJK and emoji form merges)."""
    text = (REPO / "data" / "shakespeare" / "input.txt").read_text(encoding="utf-8")
    return text[:80_000] + "\n".join(SPM_TEXTS + SMOLLM2_TEXTS) * 10


def sentencepiece_tokenizer(prefix: bool) -> Any:
    """A tokenizer.json as transformers writes Llama 2's (`prefix`: a ▁ before every text)
    or Gemma 3's: <unk> <s> </s>, the 256 byte tokens, then pieces learned from
    `training_text`; as merges every split of a piece into two pieces, the earlier-learned
    piece first (what transformers derives from a SentencePiece model); byte fallback; <s>
    before a text."""
    from tokenizers import (
        AddedToken,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    steps = [normalizers.Replace(" ", SPACE)]
    if prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    learner = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace()  # words apart: learning takes 0.1 s
    learner.train_from_iterator([training_text()],
                                trainers.BpeTrainer(vocab_size=600, show_progress=False))
    vocab = {t: i for i, t in enumerate(CONTROL_TOKENS[:3] + BYTE_TOKENS)}
    for piece, _ in sorted(learner.get_vocab().items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [(piece[:k], piece[k:]) for piece in vocab
              for k in reversed(range(1, len(piece)))
              if piece[:k] in vocab and piece[k:] in vocab]
    hf = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True,
                                fuse_unk=True))
    hf.normalizer = normalizers.Sequence(steps) if prefix else steps[0]
    if not prefix:  # as transformers writes Gemma's (a no-op after the normalizer)
        hf.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                    decoders.Fuse()]
                                   + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                      special_tokens=[("<s>", 1)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in CONTROL_TOKENS])
    hf.add_tokens([AddedToken(USER_TOKEN, special=False, normalized=False)])
    return hf


def model_dir(directory: Path, backend: Any, eos: str, **config: Any) -> Path:
    """A one-layer llama whose vocabulary is `backend`'s, saved with it."""
    n_vocab = backend.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=16,
                  arch="llama", n_kv_head=2, eos_token_id=backend.token_to_id(eos))
        ).save_pretrained(directory)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, **config}))
    return directory


def reshuffled(tok: GGUFTokenizer, seed: int) -> GGUFTokenizer:
    """`tok` with distinct, non-integer scores in a random order (unrelated to any merge
    order), "ou" user-defined, and two tokens more: two spaces, user-defined (as Gemma's
    runs of spaces are), and an unused one."""
    tokens = [*tok.tokens, "  ", "<unused0>"]
    kinds = {"ou": USER_DEFINED, "  ": USER_DEFINED, "<unused0>": UNUSED}
    types = [kinds.get(t, kind) for t, kind in zip(tokens, [*tok.types, 0, 0], strict=True)]
    order = list(range(len(tokens)))
    random.Random(seed).shuffle(order)
    return dataclasses.replace(tok, tokens=tokens, types=types,
                               scores=[-0.5 * i - 0.25 for i in order])


# The byte-level pre-tokenizers of Hugging Face files, and the name export must give them:
# (pre_tokenizer JSON, ignore_merges, llama.cpp name)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def split_then_bytes(regex: str) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}


BYTE_LEVEL_EXPORTS = {
    "llama3": (split_then_bytes(LLAMA3_SPLIT), True, "llama-bpe"),
    "llama3-merges": (split_then_bytes(LLAMA3_SPLIT), False, "dbrx"),
    "qwen2": (split_then_bytes(QWEN2_SPLIT), False, "qwen2"),
    "smollm": ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": True}]}, False, "smollm"),
}


def byte_level_dir(directory: Path, base: Path, pre: dict[str, Any], ignore_merges: bool
                   ) -> Path:
    """`base` (a gptkit model directory) with its tokenizer.json split by `pre`."""
    spec = json.loads((base / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = pre
    spec["model"]["ignore_merges"] = ignore_merges
    directory.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (directory / name).write_bytes((base / name).read_bytes())
    HFTokenizer.from_str(json.dumps(spec)).save(str(directory / "tokenizer.json"))
    return directory


# -- one llama.cpp run ------------------------------------------------------------------

@dataclasses.dataclass
class Session:
    gptkit_dir: Path  # a one-layer llama with a gptkit-trained byte-level BPE
    byte_level: GGUFTokenizer  # its tokenizer, as export reads it
    files: dict[str, Path]  # name -> GGUF file
    sources: dict[str, Path]  # name -> the tokenizer directory whose ids llama.cpp must give
    results: dict[str, dict[str, Any]]  # name -> what llama.cpp answered


PRE_NAMES = [name for pre in PRE_TOKENIZERS for name in pre.names]
# Names under which llama.cpp's detokenizer tidies spaces away (its clean_spaces: " ." ->
# ".", " 's" -> "'s", ...), as transformers' clean_up_tokenization_spaces would; gptkit
# gives the text back as it was (docs/export.md).
TIDIES_SPACES = {"gpt-2", "phi-2", "gigachat", "mpt", "olmo", "jais", "exaone4", "mellum",
                 "a.x-4.0", "llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1",
                 "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe", "stablelm2", "megrez",
                 "starcoder", "refact", "codeshell", "exaone", "minerva-7b"}


def tidied(text: str) -> str:
    """`text` as llama.cpp's clean_spaces passes leave it (for the texts of this file)."""
    text = re.sub(r" ([?!.,])", r"\1", text)
    text = text.replace(" ' ", "'")
    return re.sub(r" '(s|m|re|ve)", r"'\1", text)


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    """Every GGUF file of these tests, and llama.cpp's tokens (and texts of gptkit's ids)."""
    from gptkit.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("vocab")
    Tokenizer.train(texts=[training_text()], vocab_size=600).save_pretrained(root / "trained")
    trained = HFTokenizer.from_file(str(root / "trained" / "tokenizer.json"))
    gptkit_dir = model_dir(root / "gptkit", trained, "<|endoftext|>")
    byte_level = read_tokenizer(gptkit_dir, trained.get_vocab_size(with_added_tokens=True), {})
    files, sources = {}, {}
    for name in PRE_NAMES:  # imported: llama.cpp's tokens from the rebuilt tokenizer.json
        bos = name in PRE_TOKENIZERS[1].names  # as Llama 3's files say
        files[name] = tiny_gguf(root / f"pre-{name}.gguf",
                                dataclasses.replace(byte_level, pre=name, add_bos=bos))
        sources[name] = imported(files[name], root / f"pre-{name}")
    for prefix in (True, False):
        backend = sentencepiece_tokenizer(prefix)
        directory = model_dir(root / f"spm-{prefix}", backend, "</s>", bos_token="<s>",
                              unk_token="<unk>")
        files[f"spm-export-{prefix}"] = root / f"spm-export-{prefix}.gguf"
        export_gguf(directory, files[f"spm-export-{prefix}"], dtype="f32", progress=False)
        sources[f"spm-export-{prefix}"] = directory
        tok = read_tokenizer(directory, backend.get_vocab_size(with_added_tokens=True), {})
        name = f"spm-import-{prefix}"
        files[name] = tiny_gguf(root / f"{name}.gguf", reshuffled(tok, int(prefix)))
        sources[name] = imported(files[name], root / name)
    # a user-defined piece with ▁, which llama.cpp joins like any piece
    the = tok.tokens.index(f"{SPACE}the")
    user = reshuffled(tok, 2)
    user.types[the] = USER_DEFINED
    files["spm-user"] = tiny_gguf(root / "spm-user.gguf", user)
    sources["spm-user"] = imported(files["spm-user"], root / "spm-user")
    for name, (pre, ignore_merges, _) in BYTE_LEVEL_EXPORTS.items():
        directory = byte_level_dir(root / f"bpe-{name}", gptkit_dir, pre, ignore_merges)
        files[f"bpe-{name}"] = root / f"bpe-{name}.gguf"
        export_gguf(directory, files[f"bpe-{name}"], dtype="f32", progress=False)
        sources[f"bpe-{name}"] = directory
    ids = {name: Tokenizer.from_pretrained(d).encode_batch(SPM_TEXTS)
           for name, d in sources.items()}
    jobs = {"models": [{"path": str(files[name]), "tokenize": SPM_TEXTS,
                        "detokenize": ids[name]} for name in files]}
    answers = run_llamacpp(jobs, root)["models"]
    return Session(gptkit_dir, byte_level, files, sources,
                   dict(zip(files, answers, strict=True)))


def assert_tokenizes_as_llamacpp(source: Path, texts: list[str], answer: dict[str, Any],
                                 add_bos: bool, tidies: bool = False) -> None:
    """gptkit's and transformers' ids of `texts` from `source` equal llama.cpp's (which
    added no bos), transformers' encode adds bos exactly when llama.cpp would, and gptkit's
    decoding of the ids is llama.cpp's (`tidied` when llama.cpp `tidies` spaces)."""
    from transformers import AutoTokenizer

    ours, theirs = Tokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    bos = [theirs.bos_token_id] if add_bos else []
    for text, tokens, decoded in zip(texts, answer["tokens"], answer["texts"], strict=True):
        assert ours.encode(text) == tokens, text
        assert theirs.encode(text, add_special_tokens=False) == tokens, text
        assert theirs.encode(text) == bos + tokens, text
        assert (tidied if tidies else str)(ours.decode(tokens)) == decoded, text


# -- import ---------------------------------------------------------------------------

@dataclasses.dataclass
class SmolLM2:
    fields: dict[str, Any]  # the file's keys and values
    directory: Path  # the tokenizer files gptkit imports from them
    answer: dict[str, Any]  # what llama.cpp answers on the file


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory) -> SmolLM2:
    root = tmp_path_factory.mktemp("smollm2")
    fields = gguf_fields(smollm2_gguf)
    directory = imported(smollm2_gguf, root / "tokenizer", fields)
    job = {"path": str(smollm2_gguf), "tokenize": SMOLLM2_TEXTS,
           "detokenize": Tokenizer.from_pretrained(directory).encode_batch(SMOLLM2_TEXTS)}
    return SmolLM2(fields, directory, run_llamacpp({"models": [job]}, root)["models"][0])


def test_smollm2_tokenizes_as_llamacpp(smollm2):
    """A file from llama.cpp's own converter: gptkit and transformers give llama.cpp's ids
    for every text (digits one by one: 'smollm'), and decoding gives the text back."""
    from transformers import AutoTokenizer

    directory, answer = smollm2.directory, smollm2.answer
    meta = answer["metadata"]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert_tokenizes_as_llamacpp(directory, SMOLLM2_TEXTS, answer,
                                 add_bos=meta["tokenizer.ggml.add_bos_token"])
    ours, theirs = Tokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    for text, tokens in zip(SMOLLM2_TEXTS, answer["tokens"], strict=True):
        assert ours.decode(tokens) == theirs.decode(tokens) == text
    assert answer["tokens"][5][2:7] == [33, 34, 35, 36, 37]  # "12345": one token per digit


def test_smollm2_special_tokens_and_chat_template(smollm2):
    """bos/eos from the file's ids, <|im_end|> ends a turn, the chat template comes along
    in tokenizer_config.json and chat_template.jinja and renders in transformers."""
    from transformers import AutoTokenizer

    directory, fields = smollm2.directory, smollm2.fields
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert end_of_turn_ids(fields) == [2]  # <|im_end|>
    template = fields["tokenizer.chat_template"]
    assert config["chat_template"] == (directory / "chat_template.jinja").read_text() == template
    rendered = AutoTokenizer.from_pretrained(directory).apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_resaved_by_gptkit_still_tokenizes_as_llamacpp(smollm2, tmp_path):
    """gptkit's save_pretrained (after a fine-tune, say) keeps what transformers needs: a
    class that takes tokenizer.json as it is, and the file's bos token."""
    Tokenizer.from_pretrained(smollm2.directory).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["bos_token"] \
        == "<|im_start|>"
    assert_tokenizes_as_llamacpp(tmp_path, SMOLLM2_TEXTS, smollm2.answer, add_bos=False)


@pytest.mark.parametrize("name", PRE_NAMES)
def test_each_pre_tokenizer_splits_as_llamacpp(session, name):
    """Every `tokenizer.ggml.pre` name gptkit imports: its rebuilt tokenizer.json gives the
    ids llama.cpp gives the same file (a gptkit vocabulary under that name; Llama 3's names
    with add_bos_token)."""
    answer = session.results[name]
    assert_tokenizes_as_llamacpp(session.sources[name], SPM_TEXTS, answer,
                                 add_bos=answer["metadata"]["tokenizer.ggml.add_bos_token"],
                                 tidies=name in TIDIES_SPACES)


def test_the_texts_tell_the_pre_tokenizers_apart(session):
    """Each group of names splits some text differently from gpt-2 in llama.cpp, so the
    test above compares regexes, not just one vocabulary."""
    gpt2 = session.results["gpt-2"]["tokens"]
    for pre in PRE_TOKENIZERS[1:]:
        assert session.results[pre.name]["tokens"] != gpt2, pre.name


@pytest.mark.parametrize("prefix", [True, False], ids=["space-prefix", "no-prefix"])
def test_sentencepiece_import_tokenizes_as_llamacpp(session, prefix):
    """A `llama` (SentencePiece) vocabulary whose scores are shuffled, with control,
    user-defined (cut out of the raw text first), unused and byte tokens: gptkit and transformers give llama.cpp's ids,
    with bos added as llama.cpp adds it, and decode as llama.cpp does."""
    name = f"spm-import-{prefix}"
    meta = session.results[name]["metadata"]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.add_space_prefix"]) \
        == ("llama", prefix)
    assert_tokenizes_as_llamacpp(session.sources[name], SPM_TEXTS, session.results[name],
                                 add_bos=True)
    # the scores, not the vocabulary's order, decide the merges
    assert session.results[name]["tokens"] != session.results[f"spm-export-{prefix}"]["tokens"]


def test_user_defined_piece_with_a_space_mark_joins_as_in_llamacpp(session):
    """A user-defined "▁the" never occurs in the raw text (it has spaces), but llama.cpp
    joins pieces into it by its score as into any piece; so does the import. (llama.cpp
    prints a user-defined piece as it is, ▁ included, so only the ids are compared.)"""
    ours = Tokenizer.from_pretrained(session.sources["spm-user"])
    answer = session.results["spm-user"]
    the = ours.token_to_id(f"{SPACE}the")
    assert any(the in tokens for tokens in answer["tokens"])
    assert ours.encode_batch(SPM_TEXTS) == answer["tokens"]


# -- export ---------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [True, False], ids=["llama2-like", "gemma3-like"])
def test_sentencepiece_export_tokenizes_as_llamacpp(session, prefix):
    """A SentencePiece-style tokenizer.json (byte fallback, ▁; with or without the space
    before a text) exports as llama.cpp's `llama` tokenizer that gives its ids."""
    name = f"spm-export-{prefix}"
    fields = gguf_fields(session.files[name])
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.add_space_prefix"],
            fields["tokenizer.ggml.add_bos_token"]) == ("llama", prefix, True)
    types = dict(zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"],
                     strict=True))
    assert [types[t] for t in ("<unk>", "<s>", "<end_of_turn>", USER_TOKEN, "<0x0A>", f"{SPACE}the")] \
        == [2, 3, 3, 4, 6, 1]  # unknown, control, control, user-defined, byte, normal
    assert_tokenizes_as_llamacpp(session.sources[name], SPM_TEXTS, session.results[name],
                                 add_bos=True)


@pytest.mark.parametrize("name", BYTE_LEVEL_EXPORTS)
def test_byte_level_export_names_its_pre_tokenizer(session, name):
    """tokenizer.json split as Llama 3 (with and without ignore_merges), Qwen2 or SmolLM
    split exports under llama.cpp's name for that split, which gives its ids."""
    answer = session.results[f"bpe-{name}"]
    assert answer["metadata"]["tokenizer.ggml.pre"] == BYTE_LEVEL_EXPORTS[name][2]
    assert_tokenizes_as_llamacpp(session.sources[f"bpe-{name}"], SPM_TEXTS, answer,
                                 add_bos=False, tidies=BYTE_LEVEL_EXPORTS[name][2] in TIDIES_SPACES)


def test_gptkit_tokenizer_comes_back_unchanged(session, tmp_path):
    """gptkit's own byte-level BPE comes back from a GGUF file as the same tokenizer.json
    (the same `Tokenizer.hash`, so data prepared for the model still matches)."""
    back = imported(tiny_gguf(tmp_path / "x.gguf", session.byte_level), tmp_path / "back")
    assert Tokenizer.from_pretrained(back).hash \
        == Tokenizer.from_pretrained(session.gptkit_dir).hash


# -- refusals ---------------------------------------------------------------------------

def one_sentence(error: pytest.ExceptionInfo[GptkitError]) -> str:
    message = str(error.value)
    assert message.endswith(".") and "\n" not in message
    return message


def test_import_refuses_an_unknown_pre_tokenizer_or_model(session):
    fields = gguf_fields(session.files["gpt-2"])
    with pytest.raises(GptkitError) as error:
        tokenizer_files({**fields, "tokenizer.ggml.pre": "made-up"}, Path("x.gguf"))
    assert one_sentence(error).startswith(
        "x.gguf has the pre-tokenizer 'made-up', which gptkit does not know; it knows gpt-2, ")
    assert all(name in str(error.value) for name in ("llama-bpe", "qwen2", "smollm"))
    for model in ("bert", "t5", "rwkv"):
        with pytest.raises(GptkitError) as error:
            tokenizer_files({**fields, "tokenizer.ggml.model": model}, Path("x.gguf"))
        assert one_sentence(error) == (
            f"x.gguf has a '{model}' tokenizer, which gptkit cannot rebuild; it reads 'gpt2' "
            "(byte-level BPE) and 'llama' (SentencePiece) ones.")


def edited(session, tmp_path: Path, source: str, edit: Any) -> Path:
    """A copy of the tokenizer files of `source` with `edit` applied to tokenizer.json."""
    directory = tmp_path / source
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((session.sources[source] / name).read_bytes())
    spec = json.loads((directory / "tokenizer.json").read_text())
    edit(spec)
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    return directory


def _metaspace(spec: dict[str, Any]) -> None:
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": SPACE,
                             "prepend_scheme": "first", "split": False}


def _without_a_byte(spec: dict[str, Any]) -> None:
    spec["model"]["vocab"]["<0x41>x"] = spec["model"]["vocab"].pop("<0x41>")


def _two_bos(spec: dict[str, Any]) -> None:
    spec["post_processor"]["single"].insert(0, {"SpecialToken": {"id": "<s>", "type_id": 0}})


REFUSALS = {
    # SentencePiece-style: Metaspace's "first" puts no ▁ after a special token, llama.cpp does
    "metaspace": ("spm-export-True", _metaspace, "replaces spaces in a way other than"),
    # llama.cpp joins any two pieces that make a token; tokenizers only the listed merges
    "missing merge": ("spm-export-True", lambda s: s["model"]["merges"].pop(),
                      "has no merge ("),
    "missing byte": ("spm-export-True", _without_a_byte, "lacks the byte token <0x41>"),
    "two bos": ("spm-export-True", _two_bos, "adds ['<s>', '<s>', 'A'] around a text"),
    # byte-level: llama.cpp normalizes nothing, and splits only by the regexes it names
    "normalizer": ("bpe-qwen2", lambda s: s.update(normalizer={"type": "NFC"}),
                   "normalizes text first (NFC)"),
    "unknown split": ("bpe-qwen2", lambda s: s["pre_tokenizer"]["pretokenizers"][0].update(
        pattern={"Regex": r"\p{L}+"}), "splits text with a pre-tokenizer llama.cpp has no name"),
}


@pytest.mark.parametrize("mistake", REFUSALS)
def test_export_refuses_what_llamacpp_would_tokenize_differently(session, tmp_path, mistake):
    source, edit, words = REFUSALS[mistake]
    directory = edited(session, tmp_path, source, edit)
    with pytest.raises(GptkitError) as error:
        read_tokenizer(directory, 10_000, {})
    assert words in one_sentence(error)
