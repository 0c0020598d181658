"""Content fingerprints: tokenizers (vocabulary, merges, special tokens) and model weights."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides tokenization: vocabulary, merges, added/special tokens, and the
    normalizer/pre-tokenizer pipeline. Runtime settings (padding, truncation) are left out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:  # a slow tokenizer: fall back to the vocabulary and special tokens
        spec = {"vocab": tokenizer.get_vocab()}
    spec["special_tokens"] = {
        k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())
    }
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def tokenizer_vocab_size(tokenizer) -> int:
    """The number of distinct ids the tokenizer can produce (base vocabulary + added tokens)."""
    return len(tokenizer)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def weights_hash(path: str) -> str:
    """sha256 over a local model's weight files (name, size, bytes), or '' for a hub id."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES)
        )
    else:
        return ""
    digest = hashlib.sha256()
    for f in files:
        digest.update(os.path.basename(f).encode())
        digest.update(str(os.path.getsize(f)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def add_sequence(digest, seq_id: int, input_ids: np.ndarray, supervised: np.ndarray) -> None:
    """Feed one stored sequence into a data fingerprint (the card's `data_fingerprint` is
    "sha256:" + the hex digest over every stored sequence, in cache order): its seq_id as 8
    little-endian bytes, its token ids as little-endian int64, its supervised mask as
    np.packbits bytes (big bit order, zero-padded to a whole byte)."""
    digest.update(np.asarray(seq_id, dtype="<i8").tobytes())
    digest.update(np.asarray(input_ids, dtype="<i8").tobytes())
    digest.update(np.packbits(np.asarray(supervised, dtype=bool)).tobytes())
