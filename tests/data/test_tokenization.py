"""Documents are tokenised with the teacher tokenizer's own conventions (BOS or not, one EOS), offline.

Tokenizers are built locally: a Llama-3-like one whose post-processor adds <|begin_of_text|>, a Qwen-like one
that adds nothing, and one whose post-processor also appends EOS. All share one trained BPE vocabulary.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import make_teacher
from helpers import corpus
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lrc.data import (
    _CACHE_FORMAT,
    DocumentTemplate,
    _cache_key,
    _cache_paths,
    _file_fingerprints,
    _tokenizer_fingerprint,
    build_packed_dataset,
    detect_document_template,
    resolve_data_files,
)
from lrc.errors import UserError

BOS, LLAMA_EOS, QWEN_EOS = "<|begin_of_text|>", "<|end_of_text|>", "<|endoftext|>"
DOCS = corpus(n_docs=12)


def _backend(post: str | None) -> Tokenizer:
    """A byte-level BPE trained on the test corpus; `post` is the single-text template of its post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, LLAMA_EOS, QWEN_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    if post is not None:
        specials = [(name, tok.token_to_id(name)) for name in (BOS, LLAMA_EOS)]
        tok.post_processor = processors.TemplateProcessing(single=post, pair=f"{post} $B:1", special_tokens=specials)
    return tok


@pytest.fixture(scope="module")
def llama_like() -> PreTrainedTokenizerFast:
    """Like Llama 3: adds BOS before every text (add_special_tokens=True), EOS is a different token."""
    return PreTrainedTokenizerFast(tokenizer_object=_backend(f"{BOS} $A"), bos_token=BOS, eos_token=LLAMA_EOS)


@pytest.fixture(scope="module")
def qwen_like() -> PreTrainedTokenizerFast:
    """Like Qwen2.5/Qwen3: adds no special token at all; EOS is <|endoftext|>."""
    return PreTrainedTokenizerFast(tokenizer_object=_backend(None), eos_token=QWEN_EOS)


@pytest.fixture(scope="module")
def bos_and_eos() -> PreTrainedTokenizerFast:
    """Its post-processor puts BOS before and EOS after every text."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(f"{BOS} $A {LLAMA_EOS}"), bos_token=BOS, eos_token=LLAMA_EOS
    )


def _data(tmp_path) -> list[str]:
    """DOCS as a .jsonl file under `tmp_path`, written once (a rewrite would change the cache key)."""
    path = tmp_path / "data" / "d.jsonl"
    if not path.exists():
        path.parent.mkdir()
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    return [str(path)]


def _build(tokenizer, tmp_path, cached: bool, seq_len: int = 24):
    cache = tmp_path / "cache" if cached else None
    return build_packed_dataset(_data(tmp_path), tokenizer, seq_len=seq_len, cache_dir=cache, batch_size=5)


def _documents(ds) -> list[list[int]]:
    ends = list(ds.doc_starts[1:]) + [len(ds.tokens)]
    return [ds.tokens[s:e].tolist() for s, e in zip(ds.doc_starts, ends)]


def _check_positions_and_labels(ds, bos_id: int | None) -> None:
    """Position 0 exactly at document starts (the BOS where there is one); labels stay inside documents."""
    starts = set(ds.doc_starts.tolist())
    continuation = False
    for index in range(len(ds)):
        item = ds.get(index)
        base = index * ds.seq_len
        positions = item["position_ids"].tolist()
        continuation |= positions[0] > 0
        for i, pos in enumerate(positions):
            offset = base + i
            assert pos == offset - max(s for s in starts if s <= offset)
            assert (pos == 0) == (offset in starts)
            if bos_id is not None:
                assert (item["input_ids"][i] == bos_id) == (pos == 0)
            if i == ds.seq_len - 1 or offset + 1 in starts:
                assert item["labels"][i] == -100
            else:
                assert item["labels"][i] == ds.tokens[offset + 1]
    assert continuation, "no sequence starts mid-document: the continuation case is not exercised"


# --------------------------------------------------------------------------------------------- detection


def test_detected_templates(llama_like, qwen_like, bos_and_eos):
    # Catches a wrong probe split: e.g. BOS not found, EOS added twice, or BOS taken for a Qwen-like tokenizer.
    bos, eos = llama_like.convert_tokens_to_ids(BOS), llama_like.eos_token_id
    assert detect_document_template(llama_like, eos) == DocumentTemplate(prefix=(bos,), suffix=(eos,))
    assert detect_document_template(bos_and_eos, eos) == DocumentTemplate(prefix=(bos,), suffix=(eos,))
    qwen_eos = qwen_like.eos_token_id
    assert detect_document_template(qwen_like, qwen_eos) == DocumentTemplate(prefix=(), suffix=(qwen_eos,))


class _RewritingTokenizer:
    """Special tokens that change the text tokens themselves: no template can be read from them."""

    eos_token_id = 1
    name_or_path = "rewriting-stub"

    def encode(self, text, add_special_tokens=True):
        return [7, 8, 9] if add_special_tokens else [2, 3]


def test_undetectable_template_is_a_user_error(tmp_path):
    # Catches guessing a template (e.g. packing with none) when the tokenizer's special tokens cannot be split
    # off the text, and a build that creates its cache folder before finding out.
    with pytest.raises(UserError, match="cannot tell which special tokens tokenizer rewriting-stub adds"):
        detect_document_template(_RewritingTokenizer(), 1)
    with pytest.raises(UserError, match="cannot tell"):
        build_packed_dataset(_data(tmp_path), _RewritingTokenizer(), 8, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------ token stream


@pytest.mark.parametrize("cached", [False, True], ids=["memory", "cache"])
def test_llama_like_documents_start_with_bos(llama_like, tmp_path, cached):
    # Catches documents packed without the BOS a Llama-3-like teacher adds to every text (the old behaviour),
    # text tokens that differ from add_special_tokens=False, and missing or doubled EOS between documents.
    ds = _build(llama_like, tmp_path, cached)
    bos, eos = llama_like.convert_tokens_to_ids(BOS), llama_like.eos_token_id
    docs = _documents(ds)
    assert len(docs) == len(DOCS)
    for doc, text in zip(docs, DOCS):
        assert doc == [bos] + llama_like(text, add_special_tokens=False)["input_ids"] + [eos]
        assert doc == llama_like(text)["input_ids"] + [eos]  # exactly what the tokenizer gives a text, + EOS
        assert doc.count(bos) == 1 and doc.count(eos) == 1
    _check_positions_and_labels(ds, bos)


@pytest.mark.parametrize("cached", [False, True], ids=["memory", "cache"])
def test_qwen_like_documents_have_no_bos(qwen_like, tmp_path, cached):
    # Catches a BOS (or any token) invented for a tokenizer that adds none, e.g. from tokenizer.bos_token_id
    # or a model-name guess; documents must be text + one EOS, as before.
    ds = _build(qwen_like, tmp_path, cached)
    eos = qwen_like.eos_token_id
    specials = {qwen_like.convert_tokens_to_ids(t) for t in (BOS, LLAMA_EOS)}
    for doc, text in zip(_documents(ds), DOCS, strict=True):
        assert doc == qwen_like(text, add_special_tokens=False)["input_ids"] + [eos]
        assert doc.count(eos) == 1 and not specials & set(doc)
    _check_positions_and_labels(ds, None)


@pytest.mark.parametrize("cached", [False, True], ids=["memory", "cache"])
def test_post_processor_eos_is_not_doubled(bos_and_eos, tmp_path, cached):
    # Catches an EOS appended after a tokenizer suffix that already ends with EOS ([..., EOS, EOS]).
    ds = _build(bos_and_eos, tmp_path, cached)
    bos, eos = bos_and_eos.convert_tokens_to_ids(BOS), bos_and_eos.eos_token_id
    for doc, text in zip(_documents(ds), DOCS, strict=True):
        assert doc == bos_and_eos(text)["input_ids"]
        assert doc[0] == bos and doc[-1] == eos and doc.count(eos) == 1
    _check_positions_and_labels(ds, bos)


@pytest.mark.parametrize("kind", ["llama_like", "qwen_like"])
def test_save_and_reload_keeps_the_convention(kind, request, tmp_path):
    # Catches a convention that lives only in the in-memory object: the trainer loads the teacher's tokenizer
    # with AutoTokenizer, so the BOS (or its absence) must survive save_pretrained / from_pretrained.
    tokenizer = request.getfixturevalue(kind)
    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    want = _build(tokenizer, tmp_path, cached=False)
    got = _build(reloaded, tmp_path, cached=True)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.doc_starts, want.doc_starts)
    bos = tokenizer.convert_tokens_to_ids(BOS)
    assert (got.tokens[got.doc_starts] == bos).all() == (kind == "llama_like")


# ----------------------------------------------------------------------------------------------- caching


def test_cache_is_not_shared_across_conventions(llama_like, qwen_like, tmp_path):
    # Catches a cache key that ignores how the tokenizer frames documents: tokenizers with one vocabulary
    # but different special tokens must get separate entries, each with its own stream.
    cache = tmp_path / "cache"
    paths = _data(tmp_path)
    with_bos = build_packed_dataset(paths, llama_like, seq_len=24, cache_dir=cache)
    without = build_packed_dataset(paths, qwen_like, seq_len=24, cache_dir=cache)
    assert len(list(cache.iterdir())) == 6  # two entries of three files
    bos = llama_like.convert_tokens_to_ids(BOS)
    assert (with_bos.tokens[with_bos.doc_starts] == bos).all()
    assert not (without.tokens == bos).any()

    # The template is in the key by itself, not only through the backend hash (which a slow tokenizer lacks).
    files = resolve_data_files(paths)
    eos = llama_like.eos_token_id
    keys = {_cache_key(files, llama_like, "text", DocumentTemplate(p, (eos,))) for p in ((), (bos,))}
    assert len(keys) == 2


def _old_key(files, tokenizer, text_field: str) -> str:
    """The cache key as format v1 computed it (no template in the key)."""
    material = {
        "format": "lrc-packed-tokens-v1",
        "files": _file_fingerprints(files),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "text_field": text_field,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def test_old_format_cache_is_not_reused(llama_like, tmp_path):
    # Catches reuse of a v1 cache (documents without BOS) after the convention changed: neither the format
    # bump nor the template in the key may be dropped without this failing.
    assert _CACHE_FORMAT != "lrc-packed-tokens-v1"
    cache = tmp_path / "cache"
    cache.mkdir()
    paths = _data(tmp_path)
    eos = llama_like.eos_token_id
    old_tokens, old_starts = [], []
    for text in DOCS:  # the v1 stream: text + EOS
        old_starts.append(len(old_tokens))
        old_tokens += llama_like(text, add_special_tokens=False)["input_ids"] + [eos]
    tokens_path, docs_path = _cache_paths(cache, _old_key(resolve_data_files(paths), llama_like, "text"))
    np.save(docs_path, np.array(old_starts, dtype=np.int64))
    np.array(old_tokens, dtype=np.int32).tofile(tokens_path)

    ds = build_packed_dataset(paths, llama_like, seq_len=24, cache_dir=cache)
    assert (ds.tokens[ds.doc_starts] == llama_like.convert_tokens_to_ids(BOS)).all()
    assert len(ds.tokens) == len(old_tokens) + len(DOCS)
    assert len(list(cache.iterdir())) == 5  # a new entry (3 files) beside the old one (never deleted automatically)


# ---------------------------------------------------------------------------------------- teacher forward


def test_packed_teacher_logits_equal_each_document_alone(llama_like, tmp_path, one_thread):
    # Checks what the data.py docstrings state: given these position ids (and no attention mask), a tiny
    # Llama teacher (llama3 RoPE, sdpa) gives every document segment of a packed sequence, including a first
    # segment that continues a document at position > 0, the logits it gives that segment alone with
    # positions from 0. Fails if documents attend to each other or a continuation segment is mis-detected.
    ds = _build(llama_like, tmp_path, cached=False, seq_len=40)
    teacher = make_teacher("llama", vocab_size=len(llama_like))
    checked = {"continuation": 0, "document start": 0}
    with torch.no_grad():
        for index in range(min(len(ds), 10)):
            item = ds.get(index)
            ids, pos = item["input_ids"], item["position_ids"]
            packed = teacher(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0]
            cuts = [0] + [i for i in range(1, len(pos)) if pos[i] == 0] + [len(pos)]
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                alone = teacher(input_ids=ids[None, lo:hi], position_ids=torch.arange(hi - lo)[None], use_cache=False)
                torch.testing.assert_close(packed[lo:hi], alone.logits[0], rtol=1e-4, atol=1e-4)
                checked["continuation" if pos[lo] > 0 else "document start"] += 1
    assert min(checked.values()) > 0, checked
