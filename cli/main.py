"""`atkd-cache` commands. A thin Click layer: every command parses flags, calls one library
function and prints its result. A UserError becomes one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import json
import sys

import click

from atkd_cache.errors import UserError


def user_errors(fn):
    """Turn UserError (and a missing optional dependency) into one clear line, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: committed shards are kept; re-run to resume", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="atkd-cache")
def main() -> None:
    """Distil autoregressive LMs from an offline teacher cache."""


@main.command("dump-teacher")
@click.option("--model", required=True, help="Teacher: HF folder, hub id, or .gguf file.")
@click.option("--data", "source", required=True,
              help="json/jsonl/parquet/csv/txt file, save_to_disk folder, or hub dataset name.")
@click.option("--output", "-o", required=True, help="Cache folder (created, or resumed).")
@click.option("--tokenizer", default=None, help="Tokenizer if not the model's own.")
@click.option("--revision", default=None, help="Hub revision of the teacher.")
@click.option("--split", default="train", show_default=True)
@click.option("--text-field", default=None, help="Plain text: every token supervised.")
@click.option("--prompt-field", default=None, help="Prompt/response: prompt column.")
@click.option("--response-field", default=None, help="Prompt/response: response column.")
@click.option("--template", default=None, help="Prompt template with {prompt}.")
@click.option("--messages-field", default=None, help="Chat: list of {role, content}.")
@click.option("--max-length", type=int, default=None, help="Truncate to N tokens.")
@click.option("--limit", type=int, default=None, help="Use only the first N examples.")
@click.option("--top-k", type=int, default=32, show_default=True)
@click.option("--hard-ratio", type=float, default=0.5, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
              show_default=True, help="Teacher weights; auto = bf16 on CUDA, fp32 on CPU.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=None, help="Sequences per forward (default 8).")
@click.option("--batch-tokens", type=int, default=None, help="Padded tokens per forward.")
@click.option("--shard-positions", type=int, default=262_144, show_default=True,
              help="Supervised positions per shard.")
@click.option("--logprob-dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of top-k log-probs.")
@click.option("--trust-remote-code", is_flag=True, default=False)
@click.option("--no-progress", is_flag=True, default=False)
@user_errors
def dump_teacher_cmd(**kw) -> None:
    """Run the teacher once over a dataset and write its predictions to a cache."""
    from atkd_cache.data import DataSpec
    from atkd_cache.dump import DumpConfig, dump_teacher

    spec = DataSpec(
        source=kw.pop("source"), split=kw.pop("split"), text_field=kw.pop("text_field"),
        prompt_field=kw.pop("prompt_field"), response_field=kw.pop("response_field"),
        template=kw.pop("template"), messages_field=kw.pop("messages_field"),
        max_length=kw.pop("max_length"), limit=kw.pop("limit"),
    )
    if kw["batch_size"] is None and kw["batch_tokens"] is None:
        kw["batch_size"] = 8
    kw["progress"] = not kw.pop("no_progress")
    summary = dump_teacher(DumpConfig(data=spec, **kw), log=lambda m: click.echo(m, err=True))
    click.echo(summary.line())


@main.command("info")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@user_errors
def info_cmd(cache: str, as_json: bool) -> None:
    """Show a cache's card, counts, bytes/token and UNC/entropy summaries."""
    from atkd_cache.cache.inspect import cache_info
    from atkd_cache.cache.reader import open_cache

    info = cache_info(open_cache(cache))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    card = info.pop("card")
    click.echo(f"cache {info.pop('path')}")
    for key, value in card.items():
        click.echo(f"  {key:24s} {value}")
    for key, value in info.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k}={v:.4g}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4g}"
        click.echo(f"{key:26s} {value}")


@main.command("verify")
@click.argument("cache")
@user_errors
def verify_cmd(cache: str) -> None:
    """Re-check every checksum and the manifest against the shards."""
    from atkd_cache.cache.inspect import verify_cache
    from atkd_cache.cache.reader import open_cache

    opened = open_cache(cache)
    problems = verify_cache(opened)
    for p in problems:
        click.echo(f"CORRUPT {p}", err=True)
    if problems:
        click.echo(f"error: {len(problems)} problem(s) in {cache}", err=True)
        sys.exit(1)
    click.echo(f"ok: {len(opened.shard_rows)} shards, {opened.num_sequences} sequences, "
               f"{opened.num_supervised} supervised positions verified")


if __name__ == "__main__":
    main()
