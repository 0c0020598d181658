"""Export a top-k cache as a `datasets` dataset in axolotl's offline-KD layout.

axolotl (0.19, `axolotl.integrations.kd`) trains from pre-tokenized rows whose KD columns its
`DataCollatorForKD` pads and its KD trainer consumes:

    input_ids, attention_mask, labels   [n]     labels: -100 where not supervised (unshifted,
                                                 as in transformers)
    target_token_ids  [n][k] int   target_logprobs  [n][k] float   target_mask  [n][k] 0/1

Its loss compares row t of the target columns with the student's hidden state at t, i.e.
its prediction of token t + 1 (the CE term uses labels[t + 1]); so with align="next" (the
default) row t holds the teacher's top-k for token t + 1, masked to 1 exactly where token
t + 1 is supervised. axolotl's own producers (vLLM prompt log-probs through its chat-template
strategy or online collator) instead put the distribution *of* token t at row t and mask it
with labels[t]; align="current" writes that layout (row t + 1 = our row t) for pipelines that
expect it. The log-probs are renormalised over the top-k, as axolotl's strategy does, at the
cache's temperature (set axolotl's kd_temperature to match; docs/integrations.md).

Written as Parquet files, one per cache shard (`data/train-*.parquet`), with a dataset card
(README.md); `datasets.load_dataset(output)` reads it, and it uploads to the Hub as is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from atkd_cache.cache.reader import open_cache
from atkd_cache.errors import UserError
from atkd_cache.hf.dataset import IGNORE_INDEX
from atkd_cache.paths import check_output_folder

PAD_LOGPROB = -1e9  # what DataCollatorForKD pads log-probs with (finite: 0 * pad is 0)
ALIGNS = ("next", "current")


def _nested(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """[rows, k] values cut into lists of rows by `offsets`: list<list<...>>."""
    rows, k = values.shape
    inner = pa.ListArray.from_arrays(
        pa.array(np.arange(rows + 1, dtype=np.int32) * k), pa.array(values.reshape(-1)))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner)


def shard_table(arrays: dict[str, np.ndarray], k: int, align: str = "next") -> pa.Table:
    """One cache shard's sequences in axolotl's layout (see the module docstring)."""
    offsets = arrays["token_offsets"].astype(np.int64)
    lengths = np.diff(offsets)
    tokens = int(offsets[-1])
    # Position j of sequence i (predicting its token j + 1) is flat position p = t0_i - i + j,
    # so its token row is p + i; supervised ones, in order, own the teacher rows.
    seq_of = np.repeat(np.arange(len(lengths)), np.maximum(lengths - 1, 0))
    row = (np.arange(len(seq_of)) + seq_of)[arrays["supervised"].astype(bool)]
    target = row + 1  # the token each supervised position predicts
    at = row if align == "next" else target
    topk = arrays["topk_logprobs"].astype(np.float32)
    with np.errstate(invalid="ignore"):  # renormalise over the k kept ids
        top = topk.max(axis=1, keepdims=True)
        topk = topk - (top + np.log(np.exp(topk - top).sum(axis=1, keepdims=True)))
    ids = np.zeros((tokens, k), dtype=np.int32)
    logprobs = np.full((tokens, k), PAD_LOGPROB, dtype=np.float32)
    mask = np.zeros((tokens, k), dtype=np.int8)
    ids[at], logprobs[at], mask[at] = arrays["topk_ids"], topk, 1
    labels = np.full(tokens, IGNORE_INDEX, dtype=np.int64)
    labels[target] = arrays["input_ids"][target]
    flat = pa.array(offsets.astype(np.int32))

    def lists(values):
        return pa.ListArray.from_arrays(flat, pa.array(values))

    return pa.table({
        "input_ids": lists(arrays["input_ids"].astype(np.int32)),
        "attention_mask": lists(np.ones(tokens, dtype=np.int8)),
        "labels": lists(labels),
        "target_token_ids": _nested(ids, offsets),
        "target_logprobs": _nested(logprobs, offsets),
        "target_mask": _nested(mask, offsets),
    })


def _card(cache, align: str, files: int, rows: int) -> str:
    card = cache.card
    layout = ("t + 1 (axolotl's loss consumes it at the student's hidden state t)"
              if align == "next" else "t (the vLLM prompt log-prob layout)")
    front = "\n".join([
        "---", "configs:", "- config_name: default", "  data_files:", "  - split: train",
        "    path: data/train-*.parquet", "tags:", "- knowledge-distillation", "- axolotl",
        "---",
    ])
    facts = {
        "teacher": card.teacher_id, "teacher revision": card.teacher_revision,
        "teacher weights sha256": card.teacher_weights_hash,
        "tokenizer fingerprint": card.tokenizer_fingerprint, "top-k": card.top_k,
        "temperature": card.temperature, "alignment": align, "sequences": rows,
        "files": files, "source cache fingerprint": card.identity,
    }
    table = "\n".join(f"| {k} | `{v}` |" for k, v in facts.items())
    return f"""{front}

# Offline teacher log-probs for axolotl KD

Exported by `atkd-cache export --format axolotl` from an atkd-cache cache. Each row is one
pre-tokenized sequence with `input_ids`, `attention_mask`, `labels` and the KD columns
`target_token_ids`, `target_logprobs` (top-{card.top_k}, renormalised over the top-k at
temperature {card.temperature}) and `target_mask`; alignment `{align}`: row t holds the
teacher's distribution of token {layout}.

| field | value |
|---|---|
{table}

```yaml
plugins:
  - axolotl.integrations.kd.KDPlugin
kd_trainer: true
kd_temperature: {card.temperature}
datasets:
  - path: <this folder or Hub repo>
```
"""


def export_axolotl(cache_path: str, output: str, align: str = "next", check: bool = True,
                   progress: bool = True) -> dict:
    """Write the cache at `cache_path` to the folder `output` in axolotl's KD layout; the
    folder appears complete or not at all. Returns a summary (rows, files, positions)."""
    if align not in ALIGNS:
        raise UserError(f"--align must be one of {', '.join(ALIGNS)}, got {align!r}")
    check_output_folder(output, "export folder")
    if os.path.exists(output) and os.listdir(output):
        raise UserError(f"export folder {output} is not empty: give a new folder")
    cache = open_cache(cache_path, check=check)
    if cache.status == "partial":
        raise UserError(f"{cache_path} is {cache.status_line()}: export a finished cache; let "
                        f"its dump finish first")
    if cache.card.mode != "topk":
        raise UserError(f"cache {cache_path} is a {cache.card.mode} cache: axolotl's KD format "
                        "holds top-k log-probs; export a top-k cache (dump with --mode topk)")
    parent = os.path.dirname(os.path.abspath(output))
    tmp = tempfile.mkdtemp(prefix=".atkd-export-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "data"))
        n = len(cache.shard_rows)
        rows = positions = 0
        for shard in tqdm(range(n), desc="export", unit="shard", disable=not progress):
            table = shard_table(cache.read_shard(shard), cache.card.top_k, align)
            name = f"train-{shard:05d}-of-{n:05d}.parquet"
            pq.write_table(table, os.path.join(tmp, "data", name))
            rows += table.num_rows
            positions += cache.shard_rows[shard]["num_supervised"]
        summary = {"output": output, "rows": rows, "files": n, "supervised_positions": positions,
                   "align": align, "top_k": cache.card.top_k,
                   "temperature": cache.card.temperature}
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_card(cache, align, n, rows))
        with open(os.path.join(tmp, "atkd_export.json"), "w") as f:
            json.dump({**summary, "cache_fingerprint": cache.card.identity}, f, indent=1)
        if os.path.isdir(output):
            os.rmdir(output)  # empty (checked above)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
