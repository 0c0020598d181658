"""Teacher-pass throughput against a bare forward pass, and bytes/token for k = 8/32/64.

Same model, same padded batches: `bare` is model(ids, mask).logits; `dump` is the teacher
pass's per-batch work (forward + fused extraction + copy to host), in top-k mode (k = 64) and
in sampled mode (N = 50 draws per position, unique ids and counts on the host). Batches alternate
between the two so that machine noise hits both alike. Then the k=64 outputs are written
as caches with k = 8/32/64 (top-k is sorted, so the first k columns are the top-k) and the
on-disk bytes per supervised token are reported, with a per-array breakdown for k = 32.

    python benchmarks/bench_dump.py [--tokens 20000] [--model tiny|smollm2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(__file__))

from assets import chitchat_sequences, smollm2_folder  # noqa: E402

from atkd_cache.cache.schema import SequenceRecord  # noqa: E402
from atkd_cache.cache.writer import CacheWriter  # noqa: E402
from atkd_cache.data import DataSpec  # noqa: E402
from atkd_cache.dump import DumpConfig, build_card, length_batches  # noqa: E402
from atkd_cache.models import load_causal_lm, load_tokenizer, logits_width  # noqa: E402
from atkd_cache.split import hard_labels_np  # noqa: E402
from atkd_cache.teacher.hf import pad_batch, teacher_outputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=10000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--workdir", default="runs/bench")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    torch.manual_seed(0)
    folder = smollm2_folder(args.workdir)
    tok = load_tokenizer(folder)
    model = load_causal_lm(folder, args.dtype)
    seqs = chitchat_sequences(tok, args.tokens, args.max_length)
    n_tokens = sum(len(s.input_ids) for s in seqs)
    batches = length_batches([len(s.input_ids) for s in seqs], None, args.batch_tokens)
    print(f"teacher SmolLM2-135M-Instruct ({args.dtype}), {len(seqs)} chitchat sequences, "
          f"{n_tokens} tokens, {len(batches)} batches of <= {args.batch_tokens} padded tokens, "
          f"{torch.get_num_threads()} threads")

    # warm-up
    teacher_outputs(model, [seqs[i] for i in batches[-1]], 64)
    t_bare = t_dump = t_sampled = 0.0
    outputs: dict[int, dict] = {}
    with torch.inference_mode():
        for batch in batches:
            group = [seqs[i] for i in batch]
            ids, mask, _ = pad_batch(group, tok.pad_token_id or 0)
            t0 = time.perf_counter()
            _ = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            t1 = time.perf_counter()
            outs = teacher_outputs(model, group, 64)
            t2 = time.perf_counter()
            teacher_outputs(model, group, 0, num_samples=50)
            t3 = time.perf_counter()
            t_bare += t1 - t0
            t_dump += t2 - t1
            t_sampled += t3 - t2
            outputs.update(zip(batch, outs, strict=True))
    print(f"bare forward     {n_tokens / t_bare:8.0f} tokens/s")
    print(f"teacher pass k=64 {n_tokens / t_dump:8.0f} tokens/s   ratio {t_bare / t_dump:.3f}")
    print(f"teacher pass sampled N=50 {n_tokens / t_sampled:8.0f} tokens/s   ratio "
          f"{t_bare / t_sampled:.3f}")

    cfg = DumpConfig(model=folder, data=DataSpec("chitchat-dataset", text_field="text"),
                     output="", dtype=args.dtype)
    print("\nk   bytes/token  (on disk, Blosc-zstd + crc32c, float16 log-probs)")
    for k in (8, 32, 64):
        out = os.path.join(args.workdir, f"cache-k{k}")
        shutil.rmtree(out, ignore_errors=True)
        card = build_card(replace(cfg, top_k=k), logits_width(model), None, tok, "bench",
                          planned_shards=1)
        records = []
        for i, s in enumerate(seqs):
            o = outputs[i]
            records.append(SequenceRecord(
                seq_id=s.seq_id, input_ids=s.input_ids, supervised=s.supervised,
                target_logprob=o["target_logprob"], topk_ids=o["topk_ids"][:, :k],
                topk_logprobs=o["topk_logprobs"][:, :k], entropy=o["entropy"],
                uncertainty=o["uncertainty"], hard=hard_labels_np(-o["target_logprob"], 0.5),
            ))
        with CacheWriter(out, card) as w:
            row = w.write_shard(records, 0)
            w.finish(1)
        print(f"{k:<3d} {row['bytes'] / row['num_supervised']:8.1f}")
        if k == 32:
            shard = os.path.join(out, "shards", row["shard"])
            parts = {
                name: sum(os.path.getsize(os.path.join(dp, f))
                          for dp, _, fs in os.walk(os.path.join(shard, name)) for f in fs)
                for name in sorted(os.listdir(shard)) if name != "zarr.json"
            }
            print("    k=32 per array: " + ", ".join(
                f"{n} {b / row['num_supervised']:.2f}" for n, b in parts.items()))


if __name__ == "__main__":
    main()
