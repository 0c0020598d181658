"""The text a cache's teacher scored (cross-tokenizer students, issue 32).

A cache stores token ids, not text. Its text is recomputable exactly when the teacher's
tokenizer is byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): every token stands for fixed
bytes, so a sequence's bytes are its tokens' bytes in order, and each token's byte span
follows. `dump-teacher` therefore saves the teacher tokenizer's files into the cache folder
(tokenizer/, listed with their sha256s in the card's `text`), and this module gives them
back:

    token_bytes(tokenizer)  the exact bytes of every id (None for an id with no text)
    is_byte_level(tok)      does the tokenizer's pipeline give tokens that are exact bytes?
    load_text(cache)        the cache's tokenizer (checked against the card) and byte table

A byte-level token's string is written in the byte alphabet (one character per byte); an
added token (BOS, chat markers) stands for its UTF-8 text, which is how it appears in
rendered text. A SentencePiece tokenizer with normalisation or a dummy prefix does not give
its text back byte for byte, so such a cache is refused rather than aligned wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

from atkd_cache.cache.schema import TOKENIZER_DIR
from atkd_cache.errors import UserError


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
    decoder) with no normaliser that changes the text? NFC alone is allowed (Qwen's): it
    leaves NFC text as it is, and a text it would change is caught where it is aligned
    (train/align.py compares the bytes)."""
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
    return byte_level and set(kinds(spec.get("normalizer"))) <= {"NFC"}


def token_bytes(tokenizer) -> list[bytes | None]:
    """The exact bytes of every id of a byte-level tokenizer: a vocabulary token through the
    byte alphabet; an added (special) token as its content in UTF-8."""
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


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer's files as save_pretrained writes them (name -> bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {name: open(os.path.join(tmp, name), "rb").read()
                for name in sorted(os.listdir(tmp)) if os.path.isfile(os.path.join(tmp, name))}


def text_card(tokenizer, files: dict[str, bytes]) -> dict:
    """The card's `text` entry for a cache whose tokenizer files are `files`."""
    return {"tokenizer": TOKENIZER_DIR, "byte_level": is_byte_level(tokenizer),
            "files": {n: "sha256:" + hashlib.sha256(b).hexdigest() for n, b in files.items()}}


@dataclass
class CacheText:
    """A cache's teacher tokenizer and the bytes of each of its ids."""

    tokenizer: object
    table: list[bytes | None]

    def sequence_bytes(self, ids) -> bytes:
        """The bytes a sequence of teacher ids stands for; UserError for an id with none."""
        pieces = [self.table[int(i)] for i in ids]
        if None in pieces:
            bad = int(ids[pieces.index(None)])
            raise UserError(f"teacher token id {bad} has no bytes in the cache's tokenizer: "
                            f"the cache's text cannot be recovered")
        return b"".join(pieces)


def load_text(cache) -> CacheText:
    """The teacher tokenizer stored in `cache` (an opened Cache), its files checked against
    the card's sha256s and its fingerprint against the card's; one line when the cache has
    no text or its tokenizer is not byte-level."""
    from atkd_cache.fingerprint import tokenizer_fingerprint
    from atkd_cache.models import load_tokenizer

    text = cache.card.text
    if not text:
        raise UserError(f"{cache.path} was written before atkd-cache stored the teacher's "
                        f"tokenizer in the cache (its card has no `text`): dump it again with "
                        f"this version to train a student with another tokenizer")
    if not text.get("byte_level"):
        raise UserError(f"{cache.path}: the teacher's tokenizer is not byte-level (it "
                        f"normalises text, so its tokens do not give the text back byte for "
                        f"byte): cross-tokenizer alignment would be wrong and is refused")
    with tempfile.TemporaryDirectory() as tmp:
        for name, digest in text["files"].items():
            where = f"{cache.base.rstrip('/')}/{text['tokenizer']}/{name}"
            try:
                data = cache.fs.cat_file(where)
            except OSError:
                raise UserError(f"{cache.path}: {text['tokenizer']}/{name} is missing: the "
                                f"cache is damaged; re-copy it") from None
            if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                raise UserError(f"{cache.path}: {text['tokenizer']}/{name} does not match "
                                f"its sha256 in the card: the cache is damaged; re-copy it")
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        tokenizer = load_tokenizer(tmp)
    if tokenizer_fingerprint(tokenizer) != cache.card.tokenizer_fingerprint:
        raise UserError(f"{cache.path}: the stored tokenizer is not the one the card names "
                        f"(tokenizer_fingerprint differs): the cache is damaged")
    return CacheText(tokenizer, token_bytes(tokenizer))
