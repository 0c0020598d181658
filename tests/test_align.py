"""Byte alignment of two tokenizations (train/align.py) against a plain-Python byte walk, on
byte-level BPE tokenizers of different vocabularies built here, over text with multi-byte
UTF-8 (emoji, CJK, accents), whitespace runs, digits and chat-template markers."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from atkd_cache import tiny
from atkd_cache.cache.text import byte_alphabet, is_byte_level, token_bytes
from atkd_cache.train.align import byte_ends, chunks

TEXTS = [
    "The cat sat on the mat.",
    "naïve café — 東京 and 北京 🙂🙃 done",
    "digits 12345 and 3.14159, spaces    here\n\n\tand tabs",
    "<|im_start|>user\nWhere is the moon? 🌙<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    out = {}
    for name, size, seed in (("a", 300, 0), ("b", 420, 5), ("c", 270, 9)):
        folder = str(root / name)
        tiny.build_tokenizer(folder, vocab_size=size, seed=seed)
        out[name] = AutoTokenizer.from_pretrained(folder)
    return out


def test_the_byte_alphabet_covers_every_byte_once():
    table = byte_alphabet()
    assert sorted(table.values()) == list(range(256))
    assert all(not c.isspace() for c in table)


def test_tokens_concatenate_to_the_text_byte_for_byte(tokenizers):
    for tok in tokenizers.values():
        assert is_byte_level(tok)
        table = token_bytes(tok)
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert b"".join(table[i] for i in ids) == text.encode("utf-8")
            assert byte_ends(ids, table)[-1] == len(text.encode("utf-8"))


def walk(pieces_a: list[bytes], pieces_b: list[bytes]) -> list[tuple[int, int, int, int]]:
    """The reference: step through both token lists byte by byte; a chunk closes where both
    sides have just finished a token at the same byte."""
    out, i, j, pos_a, pos_b, lo_a, lo_b = [], 0, 0, 0, 0, 0, 0
    while i < len(pieces_a) or j < len(pieces_b):
        if j >= len(pieces_b) or (i < len(pieces_a) and pos_a <= pos_b):
            pos_a += len(pieces_a[i])
            i += 1
        else:
            pos_b += len(pieces_b[j])
            j += 1
        if pos_a == pos_b:
            out.append((lo_a, i, lo_b, j))
            lo_a, lo_b = i, j
    return out


def test_chunks_equal_a_plain_byte_walk(tokenizers):
    cut_inside_a_character = 0
    for x, y in (("a", "b"), ("a", "c"), ("b", "c"), ("a", "a")):
        ta, tb = tokenizers[x], tokenizers[y]
        bytes_a, bytes_b = token_bytes(ta), token_bytes(tb)
        for text in TEXTS:
            ia = ta(text, add_special_tokens=False)["input_ids"]
            ib = tb(text, add_special_tokens=False)["input_ids"]
            pa, pb = [bytes_a[i] for i in ia], [bytes_b[i] for i in ib]
            got = chunks(byte_ends(ia, bytes_a), byte_ends(ib, bytes_b))
            assert got == walk(pa, pb), (x, y, text)
            # every byte lies in exactly one chunk, and a chunk's bytes agree on both sides
            assert got[0][0] == got[0][2] == 0 and got[-1][1] == len(ia)
            assert got[-1][3] == len(ib)
            for a_lo, a_hi, b_lo, b_hi in got:
                assert b"".join(pa[a_lo:a_hi]) == b"".join(pb[b_lo:b_hi])
            if x == y:  # identical tokenizers: chunks are tokens
                assert got == [(k, k + 1, k, k + 1) for k in range(len(ia))]
            encoded = text.encode("utf-8")
            cut_inside_a_character += sum(
                1 for e in byte_ends(ia, bytes_a)[:-1] if (encoded[e] & 0xC0) == 0x80)
    assert cut_inside_a_character > 0  # the texts do make tokens end inside a character


def test_unequal_byte_lengths_and_unknown_ids_are_refused(tokenizers):
    tok = tokenizers["a"]
    table = token_bytes(tok)
    ids = tok("the cat", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="do not cover the same bytes"):
        chunks(byte_ends(ids, table), byte_ends(ids[:-1], table))
    table[ids[0]] = None
    with pytest.raises(ValueError, match=f"token id {ids[0]} has no bytes"):
        byte_ends(ids, table)


def test_a_normalising_tokenizer_is_not_byte_level(tmp_path):
    """A SentencePiece-style pipeline (Metaspace, NFKC normaliser) is told apart: it cannot
    be aligned by bytes and must be refused, not aligned wrong."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(tiny.synthetic_sentences(200),
                            trainer=trainers.BpeTrainer(vocab_size=120,
                                                        special_tokens=["<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert not is_byte_level(fast)
