"""Byte alignment of two tokenizations of the same text: the first piece of cross-tokenizer
distillation (issue 32), where the loader will cut teacher and student tokens into chunks.

A token's text is not its character span: byte-level BPE tokens can end inside a UTF-8
character, and HF character offsets of such tokens overlap (DESIGN §9). So every token is
mapped to its exact bytes through the byte-level alphabet (each character of a byte-level
token string stands for one byte), and two tokenizations of one byte string are cut where
both have a token boundary:

    token_bytes(tokenizer)   bytes of every id (None for an id that has no text)
    byte_ends(ids, table)    the byte offset where each token ends
    chunks(ends_a, ends_b)   [(a_lo, a_hi, b_lo, b_hi)]: token ranges covering the same bytes,
                             cut at every byte offset that ends a token on both sides

Only tokenizers whose tokens concatenate to the text byte for byte can be aligned this way:
byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) does; SentencePiece with normalisation or a
dummy prefix may not, and `is_byte_level` tells them apart so that they can be refused
rather than aligned wrong.
"""

from __future__ import annotations

import json

import numpy as np


def byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: character -> the byte it stands for. Printable bytes
    (33-126, 161-172, 174-255) stand for themselves; the other 68 bytes are given the
    characters 256, 257, ... in byte order, so no byte maps to whitespace or a control."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def is_byte_level(tokenizer) -> bool:
    """Does the tokenizer's pipeline make tokens byte-level (a ByteLevel pre-tokenizer or
    decoder, no normaliser that changes the text)?"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())

    def kinds(node) -> list[str]:
        if not node:
            return []
        if node.get("type") == "Sequence":
            parts = node.get("pretokenizers") or node.get("decoders") or \
                node.get("normalizers") or []
            return [k for p in parts for k in kinds(p)]
        return [node.get("type", "")]

    byte_level = "ByteLevel" in kinds(spec.get("pre_tokenizer")) + kinds(spec.get("decoder"))
    return byte_level and not kinds(spec.get("normalizer"))


def token_bytes(tokenizer) -> list[bytes | None]:
    """The exact bytes of every id of a byte-level tokenizer: a vocabulary token through the
    byte alphabet; an added (special) token as its content in UTF-8, which is how it appears
    in rendered text (chat template markers)."""
    alphabet = byte_alphabet()
    vocab = tokenizer.get_vocab()
    added = set(tokenizer.get_added_vocab())
    out: list[bytes | None] = [None] * len(tokenizer)
    for text, i in vocab.items():
        if i >= len(out):
            continue
        if text in added:
            out[i] = text.encode("utf-8")
        elif all(c in alphabet for c in text):
            out[i] = bytes(alphabet[c] for c in text)
    return out


def byte_ends(ids, table: list[bytes | None]) -> np.ndarray:
    """The byte offset at which each token ends (cumulative byte lengths); ValueError for
    an id with no bytes."""
    lengths = []
    for i in ids:
        b = table[int(i)]
        if b is None:
            raise ValueError(f"token id {int(i)} has no bytes in this tokenizer")
        lengths.append(len(b))
    return np.cumsum(np.asarray(lengths, dtype=np.int64))


def chunks(ends_a: np.ndarray, ends_b: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Token ranges [a_lo, a_hi) and [b_lo, b_hi) that cover the same bytes, cut at every
    byte offset where a token ends on both sides. Both must cover the same number of bytes."""
    if len(ends_a) == 0 or len(ends_b) == 0 or ends_a[-1] != ends_b[-1]:
        raise ValueError("the two tokenizations do not cover the same bytes")
    shared = np.intersect1d(ends_a, ends_b)
    a_hi = np.searchsorted(ends_a, shared) + 1  # tokens up to and including that end
    b_hi = np.searchsorted(ends_b, shared) + 1
    a_lo = np.concatenate([[0], a_hi[:-1]])
    b_lo = np.concatenate([[0], b_hi[:-1]])
    return [tuple(int(x) for x in row) for row in zip(a_lo, a_hi, b_lo, b_hi, strict=True)]
