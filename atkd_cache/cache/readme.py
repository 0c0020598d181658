"""README.md of a cache: a Hugging Face dataset card, so that the cache folder uploads to the Hub
as a dataset repo with nothing else to write. Rendered from the card (zarr.json) and the
manifest rows when a cache is completed; documentation only — no reader depends on it, and
the checksums cover the card and manifest it is made from."""

from __future__ import annotations

from atkd_cache.cache.schema import CacheCard

README_FILE = "README.md"


def _facts(card: CacheCard, rows: list[dict]) -> list[tuple[str, object]]:
    tokens = sum(r["num_tokens"] for r in rows)
    supervised = sum(r["num_supervised"] for r in rows)
    stored = sum(r["bytes"] for r in rows)
    what = (f"top-{card.top_k} ids + log-probs" if card.mode == "topk"
            else f"{card.num_samples} teacher samples per position (seed {card.sample_seed})")
    return [
        ("teacher", card.teacher_id), ("teacher revision", card.teacher_revision),
        ("teacher weights sha256", card.teacher_weights_hash or "(hub id + revision)"),
        ("teacher dtype", card.teacher_dtype), ("backend", card.backend),
        ("tokenizer fingerprint", card.tokenizer_fingerprint),
        ("vocabulary / logits width", f"{card.tokenizer_vocab_size} / {card.logits_width}"),
        ("stored per position", what), ("temperature", card.temperature),
        ("log-prob dtype / encoding", f"{card.logprob_dtype} / {card.encoding}"),
        ("data", f"{card.data_source} ({card.data_shape}, split {card.data_split})"),
        ("data fingerprint", card.data_fingerprint), ("max length", card.max_length),
        ("easy/hard labels", f"{card.label_rule}, hard ratio {card.hard_ratio}"),
        ("sequences", sum(r["num_sequences"] for r in rows)), ("tokens", tokens),
        ("supervised positions", supervised), ("shards", len(rows)),
        ("stored bytes", stored),
        ("bytes per supervised position", round(stored / max(supervised, 1), 1)),
        ("cache fingerprint", card.identity),
        ("format", f"{card.format} v{card.format_version}"),
        ("written by", f"atkd-cache {card.tool_version}, {card.created_at}"),
    ]


def render_readme(card: CacheCard, rows: list[dict]) -> str:
    """The dataset card of a cache whose committed manifest rows are `rows`."""
    table = "\n".join(f"| {k} | `{v}` |" for k, v in _facts(card, rows))
    return f"""---
tags:
- knowledge-distillation
- atkd-cache
- teacher-logprobs
viewer: false
---

# Teacher cache of `{card.teacher_id}`

An atkd-cache offline teacher cache: for every supervised token of the
data, the teacher's {"top-" + str(card.top_k) + " log-probs and ids" if card.mode == "topk"
else "sampled ids and counts"}, the log-prob of the actual next token, the entropy, the
uncertainty 1 - p(next token) and an easy/hard label, in checksummed Zarr v3 shards
(`shards/`) listed by `manifest.parquet`; `complete.json` marks the cache complete. The
layout is specified in atkd-cache's docs/cache-format.md (readable with plain zarr + pyarrow).

| field | value |
|---|---|
{table}

## Use it

Check it (every chunk and file against its sha256), then train a student from it:

```bash
atkd-cache verify .
atkd-cache train-student --cache . --student STUDENT --output runs/student --epochs 1
```

In a Hugging Face `Trainer` (LoRA, accelerate/torchrun, TRL work the same way):

```python
from atkd_cache.hf import KDCollator, KDTrainer, cache_dataset
from atkd_cache.losses.kd import LossConfig

trainer = KDTrainer(model=student, args=training_args, loss=LossConfig(loss="atkd"),
                    train_dataset=cache_dataset("path/or/url/of/this/cache"),
                    data_collator=KDCollator())
```

The student must use the teacher's tokenizer (fingerprint above). Any fsspec URL works as
the path (`s3://`, `gs://`, `hf://datasets/...` through huggingface_hub's file system).
"""
