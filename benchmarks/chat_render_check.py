"""How a real cache pairs up with a student that renders chats in its own template
(`--student-chat-template`, atkd_cache/train/chat_render.py): per cache, how its texts end
(as the template ends a chat / a reply ended by its end-of-turn token / cut short), the share
of the teacher's supervised bytes that lie in counted chunks, and the end-of-turn chunks.

    .venv/bin/python benchmarks/chat_render_check.py --student TOKENIZER CACHE [CACHE ...]

e.g. the on-policy study's SmolLM2 caches (runs/on-policy-study/caches/*) against the Llama
3-template tokenizer bench_crosstok.py builds (runs/bench/xt-student-tok-8192-llama3).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from atkd_cache.cache import open_cache  # noqa: E402
from atkd_cache.cache.text import load_text  # noqa: E402
from atkd_cache.models import load_tokenizer  # noqa: E402
from atkd_cache.train.align import cache_aligner  # noqa: E402
from atkd_cache.train.chat_render import parse  # noqa: E402


def check(path: str, student) -> dict:
    """Endings, counted and supervised bytes, end-of-turn chunks of one cache."""
    cache = open_cache(path)
    text = load_text(cache)
    aligner = cache_aligner(cache, student, chat_template=True)
    end_of_turn = text.tokenizer(aligner.rerender.teacher.end_of_turn,
                                 add_special_tokens=False)["input_ids"][0]
    endings, counted, supervised, eot = collections.Counter(), 0, 0, 0
    for seq in cache:
        rendered = text.sequence_bytes(seq.input_ids).decode("utf-8", "ignore")
        endings[parse(rendered, aligner.rerender.teacher)[1]] += 1
        aligned = aligner.align(seq)
        counted += int(aligned.chunk_bytes.sum())
        eot += int((aligned.teacher_first_id == end_of_turn).sum())
        supervised += sum(len(text.table[int(seq.input_ids[j + 1])])
                          for j in range(len(seq.supervised)) if seq.supervised[j])
    return {"sequences": len(cache), "endings": dict(endings), "counted_bytes": counted,
            "supervised_bytes": supervised, "end_of_turn_chunks": eot}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("caches", nargs="+")
    ap.add_argument("--student", required=True, help="a tokenizer folder with a chat template")
    args = ap.parse_args()
    student = load_tokenizer(args.student)
    print("| cache | sequences | endings | supervised bytes in counted chunks | "
          "end-of-turn chunks |\n|---|---|---|---|---|")
    for path in args.caches:
        r = check(path, student)
        print(f"| {os.path.basename(path.rstrip('/'))} | {r['sequences']:,} | "
              + ", ".join(f"{k} {v:,}" for k, v in sorted(r["endings"].items()))
              + f" | {r['counted_bytes']:,} of {r['supervised_bytes']:,} "
              f"({r['counted_bytes'] / r['supervised_bytes']:.2%}) | "
              f"{r['end_of_turn_chunks']:,} |")


if __name__ == "__main__":
    main()
