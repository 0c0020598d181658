"""The loader with a student of another tokenizer: what re-tokenizing and aligning every
sequence costs against same-tokenizer loading of the same cache.

    .venv/bin/python benchmarks/bench_crosstok.py            # measure, write --out
    .venv/bin/python benchmarks/bench_crosstok.py --report   # the docs/benchmarks.md table

Cache: chitchat conversations (chat template, assistant turns supervised) tokenized by
SmolLM2-135M-Instruct's tokenizer (49,152 ids, byte-level BPE) and scored by a random
2-layer model of that vocabulary: the loader's cost depends on the tokenizer, the sequence
lengths and the top-k, not on what the teacher knows. Student tokenizer: a byte-level BPE of
--student-vocab ids trained on the same conversations (ChatML markers as added tokens, as a
Qwen-style family has), and the same with Llama 3's markers and chat template for the third
loader, where the student reads each chat as its own template renders it
(`--student-chat-template`: the teacher's text parsed into messages and rendered again).
The loaders iterate one epoch of micro-batches of --batch-tokens
with the same settings (one process, no DataLoader workers: the cost lands on the training
process); the best of --repeats passes counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from atkd_cache import tiny  # noqa: E402
from atkd_cache.assets import chitchat_conversations, smollm2_folder, to_chat  # noqa: E402
from atkd_cache.cache import open_cache  # noqa: E402
from atkd_cache.cache.text import load_text  # noqa: E402
from atkd_cache.data import DataSpec  # noqa: E402
from atkd_cache.dump import DumpConfig, dump_teacher  # noqa: E402
from atkd_cache.models import load_tokenizer  # noqa: E402
from atkd_cache.train.align import cache_aligner  # noqa: E402
from atkd_cache.train.loader import CacheDataset, LoaderConfig  # noqa: E402


def build(workdir: str, chats: int, student_vocab: int) -> tuple[str, str, str]:
    """(cache, student tokenizer folder, the same with Llama 3's template), made once."""
    chat_rows = [c for c in (to_chat(x, 6) for x in chitchat_conversations()) if c][:chats]
    data = os.path.join(workdir, f"xt-chats-{chats}.jsonl")
    if not os.path.exists(data):
        with open(data, "w") as f:
            f.writelines(json.dumps({"messages": m}) + "\n" for m in chat_rows)
    teacher = os.path.join(workdir, "xt-teacher")
    if not os.path.exists(os.path.join(teacher, "config.json")):
        tok = load_tokenizer(smollm2_folder(workdir, dtype="fp32"))
        tok.save_pretrained(teacher)
        tiny.build_model(teacher, len(tok), hidden=32, layers=1)
    student = os.path.join(workdir, f"xt-student-tok-{student_vocab}")
    if not os.path.exists(os.path.join(student, "tokenizer.json")):
        texts = [m["content"] for c in chat_rows for m in c]
        tiny.build_tokenizer(student, vocab_size=student_vocab, texts=texts)
    llama3 = student + "-llama3"
    if not os.path.exists(os.path.join(llama3, "tokenizer.json")):
        texts = [m["content"] for c in chat_rows for m in c]
        tiny.build_tokenizer(llama3, vocab_size=student_vocab, texts=texts,
                             chat_template=tiny.LLAMA3_TEMPLATE, markers=tiny.LLAMA3_MARKERS)
    cache = os.path.join(workdir, f"xt-cache-{chats}")
    dump_teacher(DumpConfig(model=teacher, data=DataSpec(source=data, messages_field="messages"),
                            output=cache, top_k=32, dtype="fp32", progress=False,
                            shard_positions=65_536), log=lambda m: None)
    return cache, student, llama3


def one_pass(cache: str, cfg: LoaderConfig, aligner=None) -> dict:
    """Seconds, sequences and loss rows of one epoch of micro-batches."""
    t0 = time.perf_counter()
    seqs = rows = batches = 0
    for batch in CacheDataset(cache, cfg, aligner=aligner):
        seqs += int(batch["seq_index"].numel())
        rows += int(batch["rows"].numel())
        batches += 1
    return {"seconds": time.perf_counter() - t0, "sequences": seqs, "rows": rows,
            "batches": batches}


def report(r: dict) -> str:
    """The docs/benchmarks.md table from the results file."""
    same, other, own = r["same"], r["cross"], r["cross_own_template"]
    lines = [f"{r['sequences']:,} chitchat conversations ({r['teacher_tokens']:,} SmolLM2 "
             f"tokens, {r['supervised']:,} supervised), top-{r['top_k']}, micro-batches of "
             f"{r['batch_tokens']:,} tokens, one process, 2 CPU cores; student tokenizer: "
             f"byte-level BPE of {r['student_vocab']:,} ids. Best of {r['repeats']} passes.", "",
             "| loader | seconds | sequences/s | loss rows | rows/s |", "|---|---|---|---|---|"]
    for name, p in (("same tokenizer (collate)", same),
                    ("another tokenizer (re-tokenize + align + collate_aligned)", other),
                    ("another tokenizer, its own chat template (+ parse, re-render)", own)):
        lines.append(f"| {name} | {p['seconds']:.2f} | {p['sequences'] / p['seconds']:,.0f} | "
                     f"{p['rows']:,} | {p['rows'] / p['seconds']:,.0f} |")
    lines += ["", f"Alignment costs {other['seconds'] / same['seconds']:.2f}x the same-tokenizer "
              f"loader's time ({other['sequences'] / other['seconds']:,.0f} vs "
              f"{same['sequences'] / same['seconds']:,.0f} sequences/s); of it, re-tokenizing "
              f"the text alone takes {r['tokenize_seconds']:.2f} s. Per sequence the "
              f"alignment adds {1000 * (other['seconds'] - same['seconds']) / r['sequences']:.2f}"
              f" ms on the training process (with --num-workers it moves to the loader's "
              f"worker processes). Reading each chat in the student's own template costs "
              f"{own['seconds'] / same['seconds']:.2f}x the same-tokenizer loader's time "
              f"({own['seconds'] / other['seconds']:.2f}x the plain cross-tokenizer loader's)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chats", type=int, default=2000)
    ap.add_argument("--student-vocab", type=int, default=8192)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="runs/bench")
    ap.add_argument("--out", default="docs/bench_crosstok.json")
    ap.add_argument("--report", action="store_true", help="only print the table from --out")
    args = ap.parse_args()
    if args.report:
        print(report(json.load(open(args.out))))
        return
    os.makedirs(args.workdir, exist_ok=True)
    cache, student, llama3 = build(args.workdir, args.chats, args.student_vocab)
    opened = open_cache(cache)
    text = load_text(opened)
    aligner = cache_aligner(opened, load_tokenizer(student))
    cfg = LoaderConfig(batch_tokens=args.batch_tokens, num_workers=0)
    same = min((one_pass(cache, cfg) for _ in range(args.repeats)), key=lambda p: p["seconds"])
    cross = min((one_pass(cache, cfg, aligner) for _ in range(args.repeats)),
                key=lambda p: p["seconds"])
    templated = cache_aligner(opened, load_tokenizer(llama3), chat_template=True)
    own = min((one_pass(cache, cfg, templated) for _ in range(args.repeats)),
              key=lambda p: p["seconds"])
    texts = [text.sequence_bytes(s.input_ids).decode("utf-8", "ignore") for s in opened]
    t0 = time.perf_counter()
    for t in texts:
        aligner.tokenizer(t, add_special_tokens=False)
    out = {"sequences": len(opened), "teacher_tokens": opened.num_tokens,
           "supervised": opened.num_supervised, "top_k": opened.card.top_k,
           "batch_tokens": args.batch_tokens, "student_vocab": args.student_vocab,
           "repeats": args.repeats, "same": same, "cross": cross, "cross_own_template": own,
           "tokenize_seconds": time.perf_counter() - t0}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(report(out))


if __name__ == "__main__":
    main()
