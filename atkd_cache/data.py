"""Input data: load rows with `datasets`, tokenize them into sequences with a supervised mask.

Four shapes of data:
  ids              token ids scored exactly as given, never re-tokenized (`--token-ids`):
                   rows of `prompt_ids` + `completion_ids` (what `export --format responses`
                   and on-policy rollouts write; the completion is supervised), or
                   `input_ids` with an optional per-token `supervised` mask (token i is a
                   target; default: every token after the first);
  text             every next-token position is supervised;
  prompt_response  the template renders the prompt, the response (+ EOS) is appended; only
                   positions whose next token is in the response are supervised;
  chat             the tokenizer's chat template renders the messages; only positions whose
                   next token lies in an assistant turn (including its end-of-turn tokens)
                   are supervised.
Order is the dataset's order; `seq_id` is the example's row index in the loaded split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from atkd_cache.errors import UserError, first_line
from atkd_cache.fingerprint import add_sequence, tokenizer_fingerprint

FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
DEFAULT_TEMPLATE = "{prompt}"


@dataclass
class DataSpec:
    """Where the examples come from and how to turn them into token sequences."""

    source: str
    split: str = "train"
    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    template: str | None = None
    messages_field: str | None = None
    max_length: int | None = None
    limit: int | None = None
    token_ids: bool = False  # rows hold token ids (the "ids" shape; fields found by load_rows)
    ids_fields: tuple[str, ...] = ()  # ("prompt_ids", "completion_ids") or ("input_ids", ...)

    @property
    def shape(self) -> str:
        """Which of the four data shapes this spec selects."""
        if self.token_ids:
            return "ids"
        if self.messages_field:
            return "chat"
        if self.prompt_field or self.response_field:
            return "prompt_response"
        return "text"

    def fields(self) -> dict[str, str]:
        """The dataset fields this spec reads."""
        if self.token_ids:
            return {name: name for name in self.ids_fields}
        names = {
            "text": self.text_field,
            "prompt": self.prompt_field,
            "response": self.response_field,
            "messages": self.messages_field,
        }
        return {k: v for k, v in names.items() if v}


@dataclass
class TokenizedSequence:
    """One example as token ids; supervised[t] says whether position t (predicting
    input_ids[t + 1]) is trained on."""

    seq_id: int
    input_ids: np.ndarray  # [n] int64
    supervised: np.ndarray  # [n - 1] bool


@dataclass
class TokenizeStats:
    """What tokenization did, for the summary and the card."""

    examples: int = 0
    sequences: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    tokens: int = 0
    supervised: int = 0
    fingerprint: str = ""


def load_rows(spec: DataSpec, need_response: bool = True):
    """Load the split as a `datasets.Dataset` (local file, save_to_disk folder, or hub name).
    `need_response=False`: prompt-only rows are fine (the teacher writes the responses)."""
    import datasets

    src = spec.source
    try:
        if os.path.isdir(src) and (
            os.path.exists(os.path.join(src, "dataset_info.json"))
            or os.path.exists(os.path.join(src, "state.json"))
            or os.path.exists(os.path.join(src, "dataset_dict.json"))
        ):
            ds = datasets.load_from_disk(src)
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise UserError(
                        f"split {spec.split!r} not in {src} (has {', '.join(ds)}); pass --split"
                    )
                ds = ds[spec.split]
        elif os.path.isfile(src):
            ext = os.path.splitext(src)[1].lower()
            if ext not in FILE_BUILDERS:
                raise UserError(
                    f"cannot read {src}: use a .json, .jsonl, .parquet, .csv or .txt file, "
                    f"a save_to_disk folder, or a hub dataset name"
                )
            _check_not_empty(src)
            quiet = logging.getLogger("datasets")  # it logs the failure as a second line
            level = quiet.level
            quiet.setLevel(logging.CRITICAL)
            try:
                ds = datasets.load_dataset(FILE_BUILDERS[ext], data_files=src, split="train")
            except Exception:
                if FILE_BUILDERS[ext] == "json":  # datasets does not say which line is bad
                    _raise_bad_json_line(src)
                raise
            finally:
                quiet.setLevel(level)
        elif os.path.splitext(src)[1].lower() in FILE_BUILDERS or src.startswith((".", "/", "~")):
            raise UserError(f"data file {src} does not exist")
        else:
            ds = datasets.load_dataset(src, split=spec.split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input
        raise UserError(f"cannot load dataset {src}: {first_line(e)}") from None
    if len(ds) == 0:
        raise UserError(f"dataset {src} has no examples")
    for name in spec.fields().values():
        if name not in ds.column_names:
            raise UserError(
                f"field {name!r} is not in dataset {src} (columns: "
                f"{', '.join(ds.column_names)}); pick one with the --*-field options"
            )
    if spec.shape == "ids" and not spec.ids_fields:
        spec.ids_fields = ids_layout(ds.column_names, src)
    if need_response and spec.shape == "prompt_response" and not (
            spec.prompt_field and spec.response_field):
        raise UserError("prompt/response data needs both --prompt-field and --response-field")
    if spec.shape == "text" and not spec.text_field:
        if "text" not in ds.column_names:
            raise UserError(
                f"no text field given and dataset {src} has no 'text' column (columns: "
                f"{', '.join(ds.column_names)}); pass --text-field, --prompt-field/"
                f"--response-field or --messages-field"
            )
        spec.text_field = "text"
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    return ds


def ids_layout(columns: list[str], source: str) -> tuple[str, ...]:
    """Which token-id fields a `--token-ids` dataset holds (prompt/completion ids first)."""
    if "prompt_ids" in columns and "completion_ids" in columns:
        return ("prompt_ids", "completion_ids")
    if "input_ids" in columns:
        return ("input_ids", "supervised") if "supervised" in columns else ("input_ids",)
    raise UserError(f"--token-ids: {source} has neither prompt_ids + completion_ids nor "
                    f"input_ids (columns: {', '.join(columns)}): write token ids under those "
                    f"names (export --format responses does)")


def _check_not_empty(path: str) -> None:
    with open(path, "rb") as f:
        if not f.read(1 << 16).strip():
            raise UserError(f"data file {path} is empty: give a file with examples")


def _raise_bad_json_line(path: str) -> None:
    """Name the first line of a JSON Lines file that is not a JSON object (if any)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        json.loads(text)
        return  # one JSON document: datasets failed for another reason
    except ValueError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path} line {number}: not valid JSON ({e.msg}, column {e.colno}): "
                            f"fix or remove that line") from None
        if not isinstance(value, dict):
            raise UserError(f"{path} line {number}: a JSON {type(value).__name__}, not an "
                            f"object with fields: every line must be one example") from None


def _text_field(row: dict, name: str, seq_id: int, spec: DataSpec) -> str:
    """A text field of a row; anything but a string is a clear error naming row and type."""
    value = row[name]
    if not isinstance(value, str):
        raise UserError(
            f"{spec.source}: row {seq_id} (counting from 0) has field {name!r} = "
            f"{str(value)[:40]!r} of type {type(value).__name__}, not a string: fix or drop it"
        )
    return value


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _text_example(
    tokenizer, row: dict, spec: DataSpec, seq_id: int
) -> tuple[list[int], list[bool]]:
    ids = _encode(tokenizer, _text_field(row, spec.text_field, seq_id, spec), special=True)
    return ids, [True] * len(ids)


def _prompt_response_example(
    tokenizer, row: dict, spec: DataSpec, seq_id: int
) -> tuple[list[int], list[bool]]:
    template = spec.template or DEFAULT_TEMPLATE
    prompt = template.format(prompt=_text_field(row, spec.prompt_field, seq_id, spec))
    p = _encode(tokenizer, prompt, special=True)
    r = _encode(tokenizer, _text_field(row, spec.response_field, seq_id, spec), special=False)
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    return p + r, [False] * len(p) + [True] * len(r)


def _messages(row: dict, spec: DataSpec, seq_id: int) -> list[dict]:
    """A row's chat messages, checked to be a list of {role, content} strings."""
    messages = row[spec.messages_field]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages
    ):
        raise UserError(
            f"{spec.source}: row {seq_id} (counting from 0): field {spec.messages_field!r} must "
            f"hold a list of {{role, content}} messages with string values, got "
            f"{str(messages)[:60]!r}"
        )
    return messages


def _chat_example(
    tokenizer, row: dict, spec: DataSpec, seq_id: int
) -> tuple[list[int], list[bool]]:
    messages = _messages(row, spec, seq_id)
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    # Character spans of assistant turns: what the template adds for turn i, after the
    # generation prompt for it, up to the end of the rendering of messages[: i + 1].
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise UserError(
                "the tokenizer's chat template does not render conversations incrementally, "
                "so assistant turns cannot be located; use prompt/response fields instead"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def generation_prompts(rows, tokenizer, spec: DataSpec) -> list[tuple[list[int], str]]:
    """(prompt ids, reference reply) pairs for scoring generations: the rendered prompt of a
    prompt/response row, or a conversation up to its last assistant turn (rendered with the
    generation prompt) and that turn's text."""
    pairs = []
    for row in rows:
        if spec.shape == "prompt_response":
            prompt = (spec.template or DEFAULT_TEMPLATE).format(prompt=row[spec.prompt_field])
            pairs.append((_encode(tokenizer, prompt, True), str(row[spec.response_field])))
        elif spec.shape == "chat":
            messages = row[spec.messages_field]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                       default=None)
            if last is None:
                continue
            text = tokenizer.apply_chat_template(
                messages[:last], tokenize=False, add_generation_prompt=True
            )
            pairs.append((_encode(tokenizer, text, False), str(messages[last]["content"])))
        else:
            raise UserError("generations need prompt/response or chat data, not plain text")
    if not pairs:
        raise UserError(f"{spec.source} has no example with a reply to score")
    return pairs


def teacher_prompts(rows, tokenizer, spec: DataSpec) -> tuple[list[tuple[int, list[int]]], str]:
    """The prompts the teacher answers in `dump-teacher --generate`, as (row index, token ids),
    and their fingerprint: a prompt/response row's rendered prompt (its response field, if
    any, is not used), or a conversation up to its last user turn with the chat template's
    generation prompt. An empty prompt, or a conversation without a user turn, is refused."""
    if spec.shape == "text":
        raise UserError("--generate needs prompts: give --prompt-field (with --template) or "
                        "--messages-field, not plain text")
    if spec.shape == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template: give --messages-field only with a "
                        "chat tokenizer, or use --prompt-field")
    if spec.shape == "prompt_response" and not spec.prompt_field:
        raise UserError("--generate with prompt/response data needs --prompt-field")
    template = spec.template or DEFAULT_TEMPLATE
    digest = hashlib.sha256()
    out = []
    for row_index, row in enumerate(rows):
        if spec.shape == "chat":
            messages = _messages(row, spec, row_index)
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users or not messages[users[-1]]["content"].strip():
                raise UserError(f"{spec.source}: row {row_index} (counting from 0) has no "
                                f"non-empty user turn to answer: fix or drop it")
            text = tokenizer.apply_chat_template(
                messages[: users[-1] + 1], tokenize=False, add_generation_prompt=True
            )
            ids = _encode(tokenizer, text, special=False)
        else:
            prompt = _text_field(row, spec.prompt_field, row_index, spec)
            if not prompt.strip():
                raise UserError(f"{spec.source}: row {row_index} (counting from 0) has an "
                                f"empty prompt in field {spec.prompt_field!r}: fix or drop it")
            ids = _encode(tokenizer, template.format(prompt=prompt), special=True)
        if not ids:
            raise UserError(f"{spec.source}: row {row_index} (counting from 0) renders to no "
                            f"tokens: fix or drop it")
        ids_np = np.asarray(ids, dtype=np.int64)
        add_sequence(digest, row_index, ids_np, np.zeros(len(ids) - 1, dtype=bool))
        out.append((row_index, ids))
    return out, digest.hexdigest()


def _id_list(row: dict, name: str, seq_id: int, spec: DataSpec, vocab: int) -> list[int]:
    """A field of token ids: a list of ints in [0, vocab), else one line naming the row."""
    value = row[name]
    where = f"{spec.source}: row {seq_id} (counting from 0), field {name!r}"
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"{where} is not a list of integer token ids: fix or drop it")
    bad = [v for v in value if not 0 <= v < vocab]
    if bad:
        raise UserError(f"{where} holds token id {bad[0]}, outside the tokenizer's {vocab} ids:"
                        f" the ids were written with another tokenizer, or are damaged")
    return value


def _ids_example(tokenizer, row: dict, spec: DataSpec, seq_id: int) -> tuple[list[int], list]:
    ids, mask = _given_ids(row, spec, seq_id, len(tokenizer))
    if spec.max_length is not None and len(ids) > spec.max_length:
        raise UserError(f"{spec.source}: row {seq_id} (counting from 0) has {len(ids)} "
                        f"token ids, over --max-length {spec.max_length}: given ids are "
                        f"scored as they are, never cut; raise --max-length or drop it")
    return ids, mask


def _given_ids(row: dict, spec: DataSpec, seq_id: int, vocab: int) -> tuple[list[int], list]:
    if spec.ids_fields[0] == "prompt_ids":
        prompt = _id_list(row, "prompt_ids", seq_id, spec, vocab)
        completion = _id_list(row, "completion_ids", seq_id, spec, vocab)
        if not prompt or not completion:
            raise UserError(f"{spec.source}: row {seq_id} (counting from 0) has an empty "
                            f"{'prompt' if not prompt else 'completion'}: nothing to score; "
                            f"drop it")
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    ids = _id_list(row, "input_ids", seq_id, spec, vocab)
    if "supervised" not in spec.ids_fields:
        return ids, [False] + [True] * (len(ids) - 1)
    mask = row["supervised"]
    if not isinstance(mask, list) or len(mask) != len(ids) or not all(
            isinstance(v, (bool, int)) for v in mask):
        raise UserError(f"{spec.source}: row {seq_id} (counting from 0): 'supervised' must be "
                        f"one true/false per token of input_ids ({len(ids)}): fix or drop it")
    if mask and mask[0]:
        raise UserError(f"{spec.source}: row {seq_id} (counting from 0) marks its first token "
                        f"supervised, but nothing predicts a first token: set it false")
    return ids, [bool(v) for v in mask]


def _check_written_by(row: dict, ours: str, spec: DataSpec, seq_id: int) -> None:
    """Refuse ids a row says another tokenizer wrote (its `tokenizer_fingerprint`, if any)."""
    theirs = row.get("tokenizer_fingerprint")
    if theirs is not None and theirs != ours:
        raise UserError(f"{spec.source}: row {seq_id} (counting from 0) was written with "
                        f"another tokenizer ({str(theirs)[:19]}…, this one is {ours[:19]}…): "
                        f"score it with the tokenizer that wrote it")


SHAPES = {
    "ids": _ids_example,
    "text": _text_example,
    "prompt_response": _prompt_response_example,
    "chat": _chat_example,
}


def tokenize_rows(rows, tokenizer, spec: DataSpec) -> tuple[list[TokenizedSequence], TokenizeStats]:
    """Tokenize every row; drop sequences without a supervised position (counted)."""
    if spec.shape == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template: give --messages-field only with a chat "
            "tokenizer, or use --prompt-field/--response-field"
        )
    build = SHAPES[spec.shape]
    stats = TokenizeStats()
    digest = hashlib.sha256()
    out: list[TokenizedSequence] = []
    ours = tokenizer_fingerprint(tokenizer) if spec.shape == "ids" else None
    for seq_id, row in enumerate(rows):
        stats.examples += 1
        if ours is not None:
            _check_written_by(row, ours, spec, seq_id)
        ids, token_mask = build(tokenizer, row, spec, seq_id)
        if spec.max_length is not None and len(ids) > spec.max_length:
            ids, token_mask = ids[: spec.max_length], token_mask[: spec.max_length]
            stats.truncated += 1
        # position t is supervised when its next token x_{t+1} is
        supervised = np.asarray(token_mask[1:], dtype=bool)
        if len(ids) < 2 or not supervised.any():
            stats.dropped_empty += 1
            continue
        seq = TokenizedSequence(seq_id, np.asarray(ids, dtype=np.int64), supervised)
        add_sequence(digest, seq_id, seq.input_ids, supervised)
        out.append(seq)
        stats.tokens += len(ids)
        stats.supervised += int(supervised.sum())
    stats.sequences = len(out)
    stats.fingerprint = digest.hexdigest()
    if not out:
        raise UserError(
            f"no example of {spec.source} has a supervised token after tokenization "
            f"({stats.examples} examples read): check the fields and --max-length"
        )
    return out, stats
