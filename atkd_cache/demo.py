"""The README's main command: build a tiny teacher, tokenizer and chat data offline, dump a
teacher cache, then show `info` and `verify` of it. Runs in well under a minute on 2 cores."""

from __future__ import annotations

import argparse
import os

from atkd_cache import tiny
from atkd_cache.cache import open_cache
from atkd_cache.cache.inspect import cache_info, verify_cache
from atkd_cache.data import DataSpec
from atkd_cache.dump import DumpConfig, dump_teacher


def main(argv: list[str] | None = None) -> None:
    """Run the demo pipeline into --workdir (default runs/demo)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=32)
    args = ap.parse_args(argv)

    model = os.path.join(args.workdir, "teacher")
    if not os.path.exists(os.path.join(model, "config.json")):
        tiny.build_tokenizer(model, vocab_size=1000)
        from transformers import AutoTokenizer

        tiny.build_model(model, len(AutoTokenizer.from_pretrained(model)), hidden=128, layers=4)
    data = tiny.write_datasets(os.path.join(args.workdir, "data"), n=args.examples)
    out = os.path.join(args.workdir, "cache")
    cfg = DumpConfig(
        model=model,
        data=DataSpec(source=data["chat"], messages_field="messages"),
        output=out,
        top_k=args.top_k,
        batch_tokens=4096,
        batch_size=None,
        shard_positions=8192,
    )
    print(dump_teacher(cfg).line())
    cache = open_cache(out)
    info = cache_info(cache)
    print(
        f"{info['sequences']} sequences, {info['supervised']} supervised positions, "
        f"{info['bytes_per_supervised_token']:.1f} bytes/token, hard fraction "
        f"{info['hard_fraction']:.2f}, mean UNC {info['uncertainty']['mean']:.3f}"
    )
    problems = verify_cache(cache)
    print("verify:", "ok" if not problems else problems)
    print(f"next: atkd-cache info {out}")


if __name__ == "__main__":
    main()
