"""Byte alignment of two tokenizations of the same text: the first piece of cross-tokenizer
distillation (issue 32), where the loader will cut teacher and student tokens into chunks.

A token's text is not its character span: byte-level BPE tokens can end inside a UTF-8
character, and HF character offsets of such tokens overlap (DESIGN §9). So every token is
mapped to its exact bytes through the byte-level alphabet (each character of a byte-level
token string stands for one byte), and two tokenizations of one byte string are cut where
both have a token boundary:

    token_bytes(tokenizer)   bytes of every id (cache/text.py: the cache's side)
    byte_ends(ids, table)    the byte offset where each token ends
    chunks(ends_a, ends_b)   [(a_lo, a_hi, b_lo, b_hi)]: token ranges covering the same bytes,
                             cut at every byte offset that ends a token on both sides

Only tokenizers whose tokens concatenate to the text byte for byte can be aligned this way:
byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) does; SentencePiece with normalisation or a
dummy prefix may not, and `is_byte_level` tells them apart so that they can be refused
rather than aligned wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atkd_cache.cache.text import token_bytes
from atkd_cache.errors import UserError


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


# ------------------------------------------------------- the loader's alignment step


@dataclass
class AlignedSequence:
    """One cached sequence re-tokenized by the student, cut into chunks that cover the same
    bytes. Only chunks wholly inside the teacher's supervised spans count (every teacher
    token in the chunk is a supervised target, and its first student token has a context);
    their student tokens are the rows the loss reads."""

    student_ids: np.ndarray  # [m] the student's input: its prefix (BOS) + the text's tokens
    rows: np.ndarray  # [n] student positions whose next token is in a counted chunk
    target_ids: np.ndarray  # [n] that next token
    chunk_of_row: np.ndarray  # [n] the counted chunk (0..C-1) each row's token is in
    teacher_ll: np.ndarray  # [C] sum of the teacher's target log-probs over the chunk
    first_row: np.ndarray  # [C] index into rows of each chunk's first student token
    teacher_first: np.ndarray  # [C] the cache row (supervised index) of the chunk's first
    teacher_first_id: np.ndarray  # [C] the teacher token that starts the chunk
    chunk_bytes: np.ndarray  # [C] bytes each chunk covers
    dropped_bytes: int  # bytes past the last valid UTF-8 character (not aligned)


class Aligner:
    """Re-tokenizes cached sequences with the student's tokenizer and cuts both sides into
    chunks (the loader's alignment step). Picklable: DataLoader workers get a copy."""

    def __init__(self, teacher_table: list[bytes | None], student_tokenizer, where: str = "",
                 rerender=None):
        self.teacher_table = teacher_table
        self.tokenizer = student_tokenizer
        self.student_table = token_bytes(student_tokenizer)
        self.where = where
        # (train/chat_render.py) the student reads its own chat template's rendering of each
        # chat; its template writes any BOS, so nothing goes before it
        self.rerender = rerender
        # what the student puts before any text (a BOS), as its own call would
        self.prefix = np.zeros(0, np.int64) if rerender else np.asarray(
            student_tokenizer("", add_special_tokens=True)["input_ids"], dtype=np.int64)
        self.vocab_map = vocab_map(teacher_table, self.student_table)

    def align(self, seq) -> AlignedSequence:
        """Align one CachedSequence (input_ids, supervised, target_logprob)."""
        t_ids = np.asarray(seq.input_ids, dtype=np.int64)
        where = f"sequence {seq.seq_id}{self.where}"
        try:
            ends = byte_ends(t_ids, self.teacher_table)
        except ValueError as e:
            raise UserError(f"teacher {e} ({where}): its text cannot be aligned") from None
        data = b"".join(self.teacher_table[i] for i in t_ids.tolist())
        n_t, dropped = len(t_ids), 0
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:  # a reply cut inside a character, or stray bytes
            n_t = int(np.searchsorted(ends, e.start, side="right"))  # tokens ending ≤ it
            cut = int(ends[n_t - 1]) if n_t else 0
            dropped = len(data) - cut
            text = data[:cut].decode("utf-8", errors="strict") if n_t else ""
        pairs = None  # byte spans [t_lo, t_hi, s_lo, s_hi, whole] that pair up; None: all
        if self.rerender is not None and text:
            rendered = self.rerender(text, where)
            s_text, pairs = rendered.text, rendered.pairs
        else:
            s_text = text
        body = np.asarray(self.tokenizer(s_text, add_special_tokens=False)["input_ids"],
                          dtype=np.int64) if s_text else np.zeros(0, np.int64)
        pieces = [self.student_table[i] for i in body.tolist()]
        if None in pieces or b"".join(pieces) != s_text.encode("utf-8"):
            raise UserError(f"the student's tokenizer does not give back the bytes of "
                            f"{where} (it normalises text, e.g. NFC "
                            f"on text that is not NFC, or has tokens without bytes): "
                            f"cross-tokenizer training needs a byte-level student tokenizer "
                            f"(or normalise the data as the student does before the dump)")
        student_ids = np.concatenate([self.prefix, body])
        empty = AlignedSequence(student_ids, *(np.zeros(0, np.int64),) * 3,
                                np.zeros(0), *(np.zeros(0, np.int64),) * 4, dropped)
        if n_t == 0 or len(body) == 0:
            return empty
        s_ends = np.cumsum([len(b) for b in pieces])
        if pairs is None:
            cut = np.asarray(chunks(ends[:n_t], s_ends), dtype=np.int64).reshape(-1, 4)
        else:
            cut = paired_chunks(ends[:n_t], s_ends, pairs)
        if len(cut) == 0:
            return empty
        a_lo, a_hi, b_lo, b_hi = cut.T
        sup = np.asarray(seq.supervised[:n_t], dtype=bool)
        # token j (j ≥ 1) is a supervised target when position j - 1 is supervised
        cs = np.concatenate([[0], np.cumsum(sup)])
        keep = (a_lo >= 1) & (b_lo + len(self.prefix) >= 1)
        a_lo_c = np.maximum(a_lo, 1)
        keep &= cs[a_hi - 1] - cs[a_lo_c - 1] == a_hi - a_lo_c
        if not keep.any():
            return empty
        a_lo, a_hi, b_lo, b_hi = a_lo[keep], a_hi[keep], b_lo[keep], b_hi[keep]
        lp_at = np.zeros(len(sup), dtype=np.float64)  # the target log-prob by position
        lp_at[sup] = np.asarray(seq.target_logprob, dtype=np.float64)[:int(sup.sum())]
        cl = np.concatenate([[0.0], np.cumsum(lp_at)])
        sizes = b_hi - b_lo
        first_row = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        tokens = np.repeat(b_lo - first_row, sizes) + np.arange(int(sizes.sum()))
        prev = np.concatenate([[0], ends])
        return AlignedSequence(
            student_ids=student_ids,
            rows=tokens + len(self.prefix) - 1,
            target_ids=body[tokens],
            chunk_of_row=np.repeat(np.arange(len(sizes)), sizes),
            teacher_ll=cl[a_hi - 1] - cl[a_lo - 1],
            first_row=first_row,
            teacher_first=cs[a_lo - 1],  # supervised rows before position a_lo - 1
            teacher_first_id=t_ids[a_lo],
            chunk_bytes=prev[a_hi] - prev[a_lo],
            dropped_bytes=dropped,
        )


def paired_chunks(ends_a: np.ndarray, ends_b: np.ndarray,
                  pairs: list[tuple[int, int, int, int, bool]]) -> np.ndarray:
    """[C, 4] token ranges (a_lo, a_hi, b_lo, b_hi) inside byte spans that pair up between two
    different texts (a student's own chat rendering, train/chat_render.py): a span with the
    same bytes on both sides is cut at every offset where both sides end a token, counting
    only tokens wholly inside it; a `whole` pair (end-of-turn markers, different bytes)
    is one chunk when both sides have token boundaries at both of its ends."""
    bounds_a = np.concatenate([[0], ends_a])  # bounds[j] = where token j starts
    bounds_b = np.concatenate([[0], ends_b])
    out = []
    for a_lo, a_hi, b_lo, b_hi, whole in pairs:
        if whole:
            cuts = [(0, 0), (a_hi - a_lo, b_hi - b_lo)]
            if not (np.isin([a_lo, a_hi], bounds_a).all() and np.isin([b_lo, b_hi],
                                                                       bounds_b).all()):
                continue
        else:
            in_a = bounds_a[(bounds_a >= a_lo) & (bounds_a <= a_hi)] - a_lo
            in_b = bounds_b[(bounds_b >= b_lo) & (bounds_b <= b_hi)] - b_lo
            shared = np.intersect1d(in_a, in_b)
            cuts = [(x, x) for x in shared]
        for (xa, xb), (ya, yb) in zip(cuts[:-1], cuts[1:], strict=True):
            out.append((np.searchsorted(bounds_a, a_lo + xa), np.searchsorted(bounds_a, a_lo + ya),
                        np.searchsorted(bounds_b, b_lo + xb),
                        np.searchsorted(bounds_b, b_lo + yb)))
    return np.asarray(out, dtype=np.int64).reshape(-1, 4)


def cache_aligner(cache, tokenizer, student: str = "the student",
                  chat_template: bool = False) -> Aligner:
    """The aligner of a student's tokenizer to an opened cache's text (the cache's stored
    teacher tokenizer, cache/text.py), the student reading its own chat template's rendering
    of each chat when `chat_template`; one line when the student's tokenizer is not
    byte-level or (with `chat_template`) a side has no usable template, before anything
    heavy loads."""
    from atkd_cache.cache.text import is_byte_level, load_text
    from atkd_cache.train.chat_render import Rerender

    if not is_byte_level(tokenizer):
        raise UserError(f"{student}: its tokenizer is not byte-level (it normalises text, so "
                        f"its tokens do not give the text back byte for byte): "
                        f"--cross-tokenizer needs a byte-level student tokenizer")
    text = load_text(cache)
    rerender = Rerender(text.tokenizer, tokenizer) if chat_template else None
    return Aligner(text.table, tokenizer, f" of {cache.path}", rerender)


def vocab_map(teacher_table: list[bytes | None], student_table: list[bytes | None]
              ) -> np.ndarray:
    """teacher id -> the student id with exactly the same bytes, or -1 (GOLD's matched
    vocabulary; with one tokenizer, the identity)."""
    student = {b: i for i, b in enumerate(student_table) if b is not None}
    return np.array([student.get(b, -1) if b is not None else -1 for b in teacher_table],
                    dtype=np.int64)
