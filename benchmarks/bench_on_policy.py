"""On-policy rounds: what one round costs, stage by stage, and what the rollout stage pays
over plain generation.

    .venv/bin/python benchmarks/bench_on_policy.py            # measure, merge into --out
    .venv/bin/python benchmarks/bench_on_policy.py --report   # the docs/benchmarks.md table

Teacher: SmolLM2-135M-Instruct in fp32 (DESIGN §6); student: 6 of its 30 layers
(`init-student`, no healing: the cost does not depend on what it has learnt, only on how
long its replies are). Prompts: chitchat conversations up to their last user turn.
`atkd-cache on-policy` runs --rounds rounds of --prompts prompts x --responses replies of at
most --max-new-tokens tokens; its results.json gives each stage's seconds. The rollout
stage (dump-teacher --generate with the student, captured top-1 + target log-prob per step,
shards written) is set beside plain `model.generate(do_sample=True)` of the same student on
the same prompts, batches and reply lengths (the replies are re-generated with their
lengths as each reply's max_new_tokens: the same tokens to produce): the ratio is what the
one generation path costs over generating alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from atkd_cache.assets import smollm2_folder, write_chitchat_chats  # noqa: E402
from atkd_cache.cache import open_cache  # noqa: E402
from atkd_cache.losses.kd import LossConfig  # noqa: E402
from atkd_cache.models import load_causal_lm, load_tokenizer  # noqa: E402
from atkd_cache.recipes.on_policy import OnPolicyConfig, run_on_policy  # noqa: E402
from atkd_cache.train.student import init_student  # noqa: E402


def plain_generate_seconds(student: str, rollouts: str, batch: int) -> tuple[float, int]:
    """Seconds for plain sampling of the rollout cache's replies (same prompts, each to its
    reply's length, in batches of `batch` sorted by prompt length), and the tokens made."""
    model = load_causal_lm(student, "fp32").eval()
    tok = load_tokenizer(student)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    items = []
    for seq in open_cache(rollouts):
        start = int(seq.supervised.argmax()) + 1
        items.append((seq.input_ids[:start].tolist(), len(seq.input_ids) - start))
    items.sort(key=lambda x: len(x[0]))
    t0, made = time.perf_counter(), 0
    with torch.no_grad():
        for lo in range(0, len(items), batch):
            chunk = items[lo:lo + batch]
            width = max(len(p) for p, _ in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
            n = max(m for _, m in chunk)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
            made += sum(m for _, m in chunk)
            assert out.shape[1] == width + n
    return time.perf_counter() - t0, made


def report(results: dict) -> str:
    """The docs/benchmarks.md table from the results file."""
    r = results
    lines = [f"SmolLM2-135M-Instruct teacher (fp32), its 6-layer cut as the student, "
             f"{r['prompts']} prompts x {r['responses']} replies of at most "
             f"{r['max_new_tokens']} tokens per round, {r['round_count']} round(s), 2 CPU cores, "
             f"loss {r['loss']}.", "",
             "| round | rollout s | scoring s | training s | eval s | replies | reply tokens | "
             "teacher tokens scored |", "|---|---|---|---|---|---|---|---|"]
    for k, e in sorted(r["rounds"].items(), key=lambda kv: int(kv[0])):
        s = e.get("seconds", {})
        if "rollout" not in s:
            continue
        lines.append(f"| {k} | {s['rollout']:.1f} | {s['scoring']:.1f} | {s['training']:.1f} | "
                     f"{s.get('eval', 0):.1f} | {e['replies']} | {e['reply_tokens']} | "
                     f"{e['teacher_tokens_scored']} |")
    p = r["plain"]
    lines += ["", f"Rollout stage vs plain `generate` of the same replies (round 1, "
              f"{p['tokens']} tokens): {p['rollout_tokens_per_s']:.0f} vs "
              f"{p['plain_tokens_per_s']:.0f} tokens/s, ratio "
              f"{p['rollout_tokens_per_s'] / p['plain_tokens_per_s']:.2f} (the rollout stage "
              f"includes loading the student, capture and writing the cache)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--responses", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loss", default="kd")
    ap.add_argument("--workdir", default="runs/bench")
    ap.add_argument("--out", default="docs/bench_on_policy.json")
    ap.add_argument("--report", action="store_true", help="only print the table from --out")
    args = ap.parse_args()
    if args.report:
        print(report(json.load(open(args.out))))
        return
    teacher = smollm2_folder(args.workdir, dtype="fp32")
    student = os.path.join(args.workdir, "smollm2-6L-cut")
    if not os.path.exists(os.path.join(student, "config.json")):
        init_student(teacher, "6", student)
    data = write_chitchat_chats(os.path.join(args.workdir, "onpolicy-prompts.jsonl"),
                                args.prompts * args.rounds)
    run = tempfile.mkdtemp(prefix="bench-onpolicy-")
    results = run_on_policy(OnPolicyConfig(
        student=student, teacher=teacher, data=data, output=run, rounds=args.rounds,
        prompts_per_round=args.prompts, messages_field="messages",
        num_responses=args.responses, max_new_tokens=args.max_new_tokens,
        loss=LossConfig(loss=args.loss), lr=1e-4, batch_tokens=2048, progress=False,
        eval_data=data, eval_prompts=16), log=lambda m: None)
    for k, e in results["rounds"].items():
        if k != "0":
            cache = open_cache(os.path.join(run, f"round-{int(k):03d}", "rollouts"))
            e["reply_tokens"] = cache.num_supervised
    rollouts = os.path.join(run, "round-001", "rollouts")
    plain_s, tokens = plain_generate_seconds(student, rollouts, batch=8)
    first = results["rounds"]["1"]
    out = {"prompts": args.prompts, "responses": args.responses,
           "max_new_tokens": args.max_new_tokens, "round_count": args.rounds,
           "loss": args.loss, "rounds": results["rounds"],
           "plain": {"tokens": tokens, "plain_tokens_per_s": tokens / plain_s,
                     "rollout_tokens_per_s": first["reply_tokens"]
                     / first["seconds"]["rollout"]}}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(report(out))


if __name__ == "__main__":
    main()
