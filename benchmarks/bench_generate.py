"""Generation with capture vs plain generation: what `dump-teacher --generate` pays for
keeping the teacher's distribution at every generated token.

    .venv/bin/python benchmarks/bench_generate.py              # HF arms
    .venv-vllm/bin/python benchmarks/bench_generate.py --vllm  # vLLM CPU build arms

Teacher: SmolLM2-135M-Instruct in fp32 (DESIGN §6). Prompts: chitchat conversations up to
their last user turn through the chat template (data.teacher_prompts). Both arms of a
backend sample the same prompts to the same length (no EOS, every reply runs to
--max-new-tokens) at the same temperature and top-p, in the same batches:
  HF:   `generate_outputs` (our capture sampler: top-32 + target + entropy per step) vs
        `model.generate(do_sample=True, ...)` returning tokens only;
  vLLM: `VllmTeacher.generate` (sample log-probs k = 32, raw, parsed into arrays) vs the
        same engine's `generate` with logprobs off.
Timed: median of --repeats alternating rounds after a warm-up (which checks that both arms
generated the same number of tokens; the spec has no EOS ids, so replies run full length).
The capture arm's shards are also written once with dump-teacher --generate (EOS on, as in
real use) for bytes per generated token. Results merge into --out (JSON); --report prints
the docs/benchmarks.md table from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from atkd_cache.assets import smollm2_folder, write_chitchat_chats  # noqa: E402
from atkd_cache.data import DataSpec, load_rows, teacher_prompts  # noqa: E402
from atkd_cache.dump import length_batches  # noqa: E402
from atkd_cache.models import load_tokenizer  # noqa: E402
from atkd_cache.teacher.generate import GenerationSpec, Prompt  # noqa: E402


def prompts_of(teacher: str, data: str, n: int) -> list[Prompt]:
    spec = DataSpec(source=data, messages_field="messages", limit=n)
    pairs, _ = teacher_prompts(load_rows(spec, need_response=False), load_tokenizer(teacher),
                               spec)
    return [Prompt(row, np.asarray(ids, dtype=np.int64)) for row, ids in pairs]


def median_rounds(arms: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each arm over alternating rounds, after one warm-up of each (which
    checks that the arms generate the same number of tokens)."""
    counts = {name: fn() for name, fn in arms.items()}
    if len(set(counts.values())) != 1:
        raise SystemExit(f"the arms generated different token counts: {counts}")
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def hf_arms(teacher: str, prompts: list[Prompt], spec: GenerationSpec, k: int, batch: int):
    import torch
    from transformers import GenerationConfig

    from atkd_cache.models import load_causal_lm
    from atkd_cache.teacher.generate import generate_outputs

    torch.manual_seed(0)
    model = load_causal_lm(teacher, "fp32")
    model.generation_config = GenerationConfig(pad_token_id=0)  # no EOS: full-length replies
    batches = [[prompts[i] for i in b] for b in length_batches(
        [len(p.input_ids) for p in prompts], batch, None)]

    def capture():
        return sum(len(seq.input_ids) - len(p.input_ids) for b in batches
                   for p, (seq, _) in zip(b, generate_outputs(model, b, spec, k, pad_id=0),
                                          strict=True))

    def plain():
        tokens = 0
        for b in batches:
            width = max(len(p.input_ids) for p in b)
            ids = torch.zeros((len(b), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(b):
                ids[r, width - len(p.input_ids):] = torch.from_numpy(p.input_ids)
                mask[r, width - len(p.input_ids):] = 1
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                     temperature=spec.temperature, top_p=spec.top_p,
                                     top_k=None, max_new_tokens=spec.max_new_tokens,
                                     pad_token_id=0)
            tokens += (out.shape[1] - width) * len(b)
        return tokens

    return {"capture": capture, "plain": plain}


def vllm_arms(teacher: str, prompts: list[Prompt], spec: GenerationSpec, k: int):
    import vllm
    from vllm.inputs import TokensPrompt

    from atkd_cache.teacher.vllm import VllmTeacher

    engine = VllmTeacher(teacher, k, "fp32", enforce_eager=True)
    inputs = [TokensPrompt(prompt_token_ids=p.input_ids.tolist()) for p in prompts]
    plain_params = [vllm.SamplingParams(max_tokens=spec.max_new_tokens, ignore_eos=True,
                                        temperature=spec.temperature, top_p=spec.top_p,
                                        seed=i, detokenize=False) for i in range(len(prompts))]
    def capture():
        return sum(len(seq.input_ids) - len(p.input_ids)
                   for p, (seq, _) in zip(prompts, engine.generate(prompts, spec), strict=True))

    def plain():
        outs = engine.llm.generate(inputs, plain_params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    return {"capture": capture, "plain": plain}


def real_dump(teacher: str, data: str, n: int, spec: GenerationSpec, k: int,
              backend: str) -> dict:
    """Bytes on disk per generated (supervised) token of a --generate cache of these prompts
    (EOS ends replies here, as in real use), and how many replies had none in the budget."""
    from atkd_cache.cache import open_cache
    from atkd_cache.cache.inspect import cache_info
    from atkd_cache.dump import DumpConfig, dump_teacher

    with tempfile.TemporaryDirectory() as tmp:
        s = dump_teacher(DumpConfig(
            model=teacher, data=DataSpec(source=data, messages_field="messages", limit=n),
            output=os.path.join(tmp, "c"), top_k=k, dtype="fp32", progress=False,
            backend=backend, generate=True, max_new_tokens=spec.max_new_tokens,
            gen_temperature=spec.temperature, top_p=spec.top_p, enforce_eager=True,
        ), log=lambda m: None)
        info = cache_info(open_cache(os.path.join(tmp, "c")))
    return {"bytes_per_token": s.bytes / s.supervised,
            "truncated_responses": info["truncated_responses"],
            "mean_response_tokens": info["response_tokens"]["mean"]}


def report(results: dict) -> str:
    """The docs/benchmarks.md table, from the results file."""
    lines = ["| backend | prompts × new tokens | capture tokens/s | plain tokens/s | "
             "capture / plain | bytes per generated token | replies without EOS (of "
             "prompts; mean length) |", "|---|---|---|---|---|---|---|"]
    for backend, r in results.items():
        tokens = r["prompts"] * r["max_new_tokens"]
        cap, plain = tokens / r["seconds"]["capture"], tokens / r["seconds"]["plain"]
        lines.append(f"| {backend} | {r['prompts']} × {r['max_new_tokens']} | {cap:.0f} | "
                     f"{plain:.0f} | {cap / plain:.2f} | {r['bytes_per_token']:.1f} | "
                     f"{r['truncated_responses']} ({r['mean_response_tokens']:.0f} tokens) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm", action="store_true", help="the vLLM arms (run in .venv-vllm)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="HF: replies per generate call")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="runs/bench")
    ap.add_argument("--out", default="docs/bench_generate.json")
    ap.add_argument("--report", action="store_true", help="only print the table from --out")
    args = ap.parse_args()
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    if args.report:
        print(report(results))
        return
    teacher = smollm2_folder(args.workdir, dtype="fp32")
    data = write_chitchat_chats(os.path.join(args.workdir, "gen-prompts.jsonl"), args.prompts)
    prompts = prompts_of(teacher, data, args.prompts)
    spec = GenerationSpec(temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens)
    backend = "vllm" if args.vllm else "hf"
    arms = (vllm_arms(teacher, prompts, spec, args.top_k) if args.vllm
            else hf_arms(teacher, prompts, spec, args.top_k, args.batch))
    seconds = median_rounds(arms, args.repeats)
    del arms  # one vLLM engine at a time
    results[backend] = {
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "top_k": args.top_k,
        "temperature": args.temperature, "top_p": args.top_p, "repeats": args.repeats,
        "seconds": seconds,
        **real_dump(teacher, data, args.prompts, spec, args.top_k, backend),
    }
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(report({backend: results[backend]}))


if __name__ == "__main__":
    main()
