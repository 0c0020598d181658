"""`atkd-cache` commands. A thin Click layer: every command parses flags, calls one library
function and prints its result. A UserError becomes one line on stderr and exit code 2."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import click

from atkd_cache.errors import UserError
from atkd_cache.losses.names import BASES, CROSS_TOKENIZER, LOSSES, MIXES, SPLITS, TAILS
from atkd_cache.recipes.study_config import (
    CrossTokStudyConfig,
    OnPolicyStudyConfig,
    StudyConfig,
    crosstok_study_config,
    on_policy_study_config,
    study_config,
)


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    """--teacher-weights "0.7,0.3" -> (0.7, 0.3)."""
    if text is None:
        return None
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise UserError(f"--teacher-weights {text!r}: give numbers separated by commas, one "
                        f"per --cache (e.g. 0.7,0.3)") from None


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
@click.option("--token-ids", is_flag=True, default=False,
              help="Rows hold token ids, scored as given: prompt_ids + completion_ids (export "
                   "--format responses), or input_ids [+ supervised per token].")
@click.option("--max-length", type=int, default=None,
              help="Truncate to N tokens (--token-ids: refuse longer rows).")
@click.option("--limit", type=int, default=None, help="Use only the first N examples.")
@click.option("--top-k", type=int, default=32, show_default=True, help="Top-k mode: ids kept.")
@click.option("--mode", type=click.Choice(["topk", "sampled"]), default="topk",
              show_default=True,
              help="topk: top-k ids + log-probs; sampled: unbiased draws from the teacher.")
@click.option("--num-samples", type=int, default=50, show_default=True,
              help="Sampled mode: draws per position (1..255).")
@click.option("--sample-seed", type=int, default=0, show_default=True,
              help="Sampled mode: draws are seeded by (seed, sequence id).")
@click.option("--encoding", type=click.Choice(["standard", "packed"]), default="standard",
              show_default=True,
              help="packed: rounded float mantissas + delta-coded ids (smaller, docs).")
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
@click.option("--backend", type=click.Choice(["hf", "vllm", "server"]), default="hf",
              show_default=True,
              help="Teacher engine: transformers, vLLM's offline engine, or running vLLM "
                   "servers (--url; --model is the served model name).")
@click.option("--url", "urls", multiple=True,
              help="--backend server: a vLLM server's base URL (repeat for a fleet).")
@click.option("--concurrency", type=int, default=8, show_default=True,
              help="--backend server: requests in flight per server.")
@click.option("--request-timeout", type=float, default=300.0, show_default=True,
              help="--backend server: seconds per request before it is retried.")
@click.option("--retries", type=int, default=8, show_default=True,
              help="--backend server: tries per sequence before the dump stops.")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vLLM.")
@click.option("--max-model-len", type=int, default=None, help="vLLM.")
@click.option("--gpu-memory-utilization", type=float, default=None,
              help="vLLM (on its CPU build: share of RAM; default 0.25 there, 0.9 on CUDA).")
@click.option("--max-num-batched-tokens", type=int, default=None, help="vLLM.")
@click.option("--enforce-eager", is_flag=True, default=False,
              help="vLLM: no torch.compile / CUDA graphs (faster start, slower steady state).")
@click.option("--rank", type=int, default=None,
              help="Data parallel: this process's rank (default: torchrun's / SLURM's).")
@click.option("--world-size", type=int, default=None,
              help="Data parallel: number of ranks (default: torchrun's / SLURM's, else 1).")
@click.option("--generate", is_flag=True, default=False,
              help="The teacher writes the responses to the prompts (chat up to the last user "
                   "turn, or --prompt-field) and its distribution is captured as it writes "
                   "(hf, vllm, or server started with the default --logprobs-mode raw_logprobs).")
@click.option("--num-responses", type=int, default=1, show_default=True,
              help="--generate: replies per prompt.")
@click.option("--gen-temperature", type=float, default=1.0, show_default=True,
              help="--generate: sampling temperature (the cache stores the T = 1 distribution).")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="--generate: nucleus sampling.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True,
              help="--generate: reply budget in tokens.")
@click.option("--greedy", is_flag=True, default=False, help="--generate: argmax decoding.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="--generate: every reply is seeded by (seed, sequence id).")
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
        max_length=kw.pop("max_length"), limit=kw.pop("limit"), token_ids=kw.pop("token_ids"),
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
    click.echo(f"fingerprint {info.pop('fingerprint')}")
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
    """Re-check every file of a cache: chunks, metadata, card, manifest, completion."""
    from atkd_cache.cache.inspect import leftovers, verify_cache
    from atkd_cache.cache.reader import open_cache

    opened = open_cache(cache, check=False)  # verify reports every problem, not the first
    problems = verify_cache(opened)
    for note in leftovers(opened):
        click.echo(f"note: {note}", err=True)
    for p in problems:
        click.echo(f"CORRUPT {p}", err=True)
    if problems:
        click.echo(f"error: {len(problems)} problem(s) in {cache}", err=True)
        sys.exit(1)
    click.echo(f"ok: {opened.status_line()}, {opened.num_sequences} sequences, "
               f"{opened.num_supervised} supervised positions verified")


@main.command("concat")
@click.argument("caches", nargs=-1, required=True)
@click.option("--output", "-o", required=True, help="New cache folder.")
@user_errors
def concat_cmd(caches: tuple[str, ...], output: str) -> None:
    """Join caches made with the same card from different parts of the data."""
    from atkd_cache.cache.concat import concat_caches

    joined = concat_caches(list(caches), output)
    click.echo(f"joined {len(caches)} caches into {output}: {len(joined.shard_rows)} shards, "
               f"{len(joined)} sequences, {joined.num_supervised} supervised positions; "
               f"fingerprint {joined.card.identity}")


@main.command("export")
@click.argument("cache")
@click.option("--format", "fmt", type=click.Choice(["axolotl", "responses"]), required=True,
              help="axolotl: a datasets (Parquet) dataset for axolotl's KD plugin; responses: "
                   "the teacher's replies of a --generate cache as JSONL (prompt, completion).")
@click.option("--output", "-o", required=True,
              help="New folder for the exported dataset (responses: a .jsonl file).")
@click.option("--tokenizer", default=None,
              help="responses: tokenizer that decodes the text (default: the card's teacher).")
@click.option("--align", type=click.Choice(["next", "current"]), default="next",
              show_default=True,
              help="next: row t holds the distribution of token t+1 (what axolotl's KD loss "
                   "consumes at hidden state t); current: of token t (vLLM prompt log-probs).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@user_errors
def export_cmd(cache: str, fmt: str, output: str, tokenizer: str | None, align: str,
               progress: bool) -> None:
    """Write a cache in another tool's format (docs/integrations.md)."""
    if fmt == "responses":
        from atkd_cache.responses import export_responses

        s = export_responses(cache, output, tokenizer, progress)
        click.echo(f"exported {s['rows']} teacher responses ({s['num_responses']} per prompt, "
                   f"{s['truncated']} truncated: no EOS within max_new_tokens) to {output}")
        return
    from atkd_cache.hf.axolotl import export_axolotl

    s = export_axolotl(cache, output, align=align, progress=progress)
    click.echo(f"exported {s['rows']} sequences ({s['supervised_positions']} supervised "
               f"positions, top-{s['top_k']}, temperature {s['temperature']}, align "
               f"{s['align']}) to {output} in {s['files']} Parquet file(s); set axolotl's "
               f"kd_temperature: {s['temperature']}")


@main.command("init-student")
@click.option("--from", "teacher", required=True, help="Teacher: HF folder, hub id or .gguf.")
@click.option("--layers", required=True,
              help="How many layers to keep (evenly spaced), or a comma list of indices.")
@click.option("--output", "-o", required=True, help="New student folder.")
@click.option("--tokenizer", default=None,
              help="Another byte-level tokenizer for the student: its embeddings move to that "
                   "vocabulary (each new token from the mean of the old embeddings of its "
                   "text); train it with train-student --cross-tokenizer.")
@click.option("--trust-remote-code", is_flag=True, default=False)
@user_errors
def init_student_cmd(teacher: str, layers: str, output: str, tokenizer: str | None,
                     trust_remote_code: bool) -> None:
    """Build a smaller student from a subset of the teacher's layers (saved as an HF folder)."""
    from atkd_cache.train.student import init_student

    kept = init_student(teacher, layers, output, trust_remote_code, tokenizer=tokenizer)
    click.echo(f"student: {output} keeps teacher layers {','.join(map(str, kept))}")


@main.command("train-student")
@click.option("--cache", required=True, multiple=True,
              help="Cache folder or fsspec URL; repeat it for several teachers' caches of the "
                   "same data.")
@click.option("--teacher-weights", default=None,
              help="Several caches: comma-separated weights, one per --cache (default equal).")
@click.option("--mix", type=click.Choice(MIXES), default="mixture", show_default=True,
              help="Several caches: how the teachers join (docs/losses.md §7).")
@click.option("--student", required=True, help="Student: HF folder, hub id, or .gguf file.")
@click.option("--output", "-o", required=True, help="Run folder (checkpoints, metrics, model).")
@click.option("--tokenizer", default=None, help="Student tokenizer if not the student's own.")
@click.option("--loss", type=click.Choice(LOSSES), default="atkd", show_default=True)
@click.option("--base", type=click.Choice(BASES), default="fkl", show_default=True,
              help="Divergence for kd, or under atkd.")
@click.option("--alpha", type=float, default=0.2, show_default=True,
              help="ATKD weight of easy tokens.")
@click.option("--hard-ratio", type=float, default=0.5, show_default=True)
@click.option("--split-scope", type=click.Choice(SPLITS), default="cache", show_default=True,
              help="Easy/hard labels from the cache, or re-split per sequence / batch.")
@click.option("--tail", type=click.Choice(TAILS), default="bucket",
              show_default=True)
@click.option("--ce-weight", type=float, default=0.0, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--beta", type=float, default=0.5, show_default=True, help="jsd beta.")
@click.option("--skew", type=float, default=0.1, show_default=True, help="skl/srkl alpha.")
@click.option("--discount", type=float, default=1.0, show_default=True,
              help="rkl-tokens: discount of the per-token terms' returns (1 = exact, and "
                   "noisy: docs/losses.md section 8).")
@click.option("--cross-tokenizer", type=click.Choice(CROSS_TOKENIZER), default=None,
              help="A student with another tokenizer than the teacher's: the cache's text is "
                   "re-tokenized and cut into byte-aligned chunks; alm (chunk likelihoods), "
                   "uld (sorted distance) or gold (matched vocabulary + sorted distance). "
                   "Replaces --loss; CE with --ce-weight (docs/losses.md section 9).")
@click.option("--chunk-temperature", type=float, default=1.0, show_default=True,
              help="alm: temperature on the chunk log-likelihoods.")
@click.option("--student-chat-template", is_flag=True, default=False,
              help="--cross-tokenizer: the student reads each chat as its own chat template "
                   "renders it (the cached messages re-rendered; reply bytes must not change), "
                   "not the teacher's rendering.")
@click.option("--batch-tokens", type=int, default=8192, show_default=True,
              help="Padded (or packed) tokens per micro-batch.")
@click.option("--pack", is_flag=True, default=False, help="Pack sequences into one row.")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--min-lr-ratio", type=float, default=0.1, show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--warmup-ratio", type=float, default=0.0, show_default=True,
              help="Warmup as a share of the run's steps (when --warmup-steps is 0).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--clip", type=float, default=1.0, show_default=True, help="Max grad norm; 0=off.")
@click.option("--max-steps", type=int, default=None)
@click.option("--epochs", type=int, default=None)
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto",
              show_default=True, help="auto = bf16 autocast on CUDA, fp32 elsewhere.")
@click.option("--gradient-checkpointing", is_flag=True, default=False)
@click.option("--fsdp", is_flag=True, default=False,
              help="Shard the student over the ranks with FSDP2 instead of replicating it (DDP).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shuffle-buffer", type=int, default=1024, show_default=True)
@click.option("--num-workers", type=int, default=1, show_default=True)
@click.option("--read-ahead", type=int, default=1, show_default=True,
              help="Shards each loader worker decodes ahead (hides remote-cache latency).")
@click.option("--checkpoint-every", type=int, default=0, show_default=True,
              help="Steps between checkpoints; 0 = only at the end.")
@click.option("--keep-checkpoints", type=int, default=2, show_default=True)
@click.option("--resume", is_flag=True, default=False, help="Continue from the last checkpoint.")
@click.option("--log-every", type=int, default=1, show_default=True)
@click.option("--log-sequences", is_flag=True, default=False,
              help="Record which sequences each step used (sequences-rank<r>.jsonl).")
@click.option("--no-tensorboard", is_flag=True, default=False)
@click.option("--no-fused-head", is_flag=True, default=False,
              help="Materialise the [N, V] student logits (LM head, then the loss) instead of "
                   "the fused LM head + loss.")
@click.option("--allow-partial", is_flag=True, default=False,
              help="Train on the committed shards of a cache whose dump has not finished.")
@click.option("--skip-checksums", is_flag=True, default=False,
              help="Do not compare shards with the manifest's sha256s as they load "
                   "(for a cache you verified; hashing is ~1 % of decoding).")
@click.option("--trust-remote-code", is_flag=True, default=False)
@click.option("--no-progress", is_flag=True, default=False)
@user_errors
def train_student_cmd(**kw) -> None:
    """Train a student on a cache (run under torchrun for data parallelism)."""
    from atkd_cache.losses.kd import LossConfig
    from atkd_cache.train.loader import LoaderConfig
    from atkd_cache.train.trainer import TrainConfig, train

    loss = LossConfig(
        loss=kw.pop("loss"), base=kw.pop("base"), alpha=kw.pop("alpha"),
        hard_ratio=kw.pop("hard_ratio"), split=kw.pop("split_scope"), tail=kw.pop("tail"),
        ce_weight=kw.pop("ce_weight"), temperature=kw.pop("temperature"),
        beta=kw.pop("beta"), skew=kw.pop("skew"), mix=kw.pop("mix"),
        teacher_weights=parse_weights(kw.pop("teacher_weights")), discount=kw.pop("discount"),
        cross_tokenizer=kw.pop("cross_tokenizer") or "",
        chunk_temperature=kw.pop("chunk_temperature"),
    )
    caches = list(kw.pop("cache"))
    kw["cache"] = caches[0] if len(caches) == 1 else caches
    loader = LoaderConfig(
        batch_tokens=kw.pop("batch_tokens"), pack=kw.pop("pack"), seed=kw["seed"],
        shuffle_buffer=kw.pop("shuffle_buffer"), num_workers=kw.pop("num_workers"),
        read_ahead=kw.pop("read_ahead"), verify_reads=not kw.pop("skip_checksums"),
    )
    kw["progress"] = not kw.pop("no_progress")
    kw["tensorboard"] = not kw.pop("no_tensorboard")
    kw["fused_head"] = not kw.pop("no_fused_head")
    summary = train(TrainConfig(loss=loss, loader=loader, **kw),
                    log=lambda m: click.echo(m, err=True))
    click.echo(f"trained {summary['steps']} steps on {summary['tokens_seen']} supervised tokens "
               f"in {summary['seconds']:.1f}s; student saved to {kw['output']}/model")


@main.command("evaluate")
@click.option("--model", default=None, help="Student to evaluate: HF folder, hub id, or .gguf.")
@click.option("--cache", multiple=True,
              help="Held-out cache: NLL, agreement, KL, ECE; repeat it for several teachers' "
                   "caches of the same data (KL and agreement to each and to the joined one).")
@click.option("--teacher-weights", default=None, help="Several caches: one weight per --cache.")
@click.option("--mix", type=click.Choice(MIXES), default="mixture", show_default=True,
              help="Several caches: how the teachers join.")
@click.option("--data", "source", default=None,
              help="Prompt/response or chat data: greedy replies scored by ROUGE-L.")
@click.option("--split", default="train", show_default=True)
@click.option("--prompt-field", default=None)
@click.option("--response-field", default=None)
@click.option("--template", default=None, help="Prompt template with {prompt}.")
@click.option("--messages-field", default=None)
@click.option("--gen-limit", type=int, default=64, show_default=True,
              help="Examples of --data to generate for.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--teacher", default=None, help="Also generate with this teacher (its ROUGE-L).")
@click.option("--tokenizer", default=None)
@click.option("--limit", type=int, default=None, help="Sequences of the cache to use.")
@click.option("--batch-tokens", type=int, default=8192, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_out", default=None, help="Also write the results as JSON here.")
@click.option("--samples", default=None, help="Write prompts, replies, references (JSONL).")
@click.option("--plot", "plot_runs", multiple=True,
              help="train-student run folder(s): write PNG training curves (repeatable).")
@click.option("--plot-output", default="training-curves.png", show_default=True)
@click.option("--trust-remote-code", is_flag=True, default=False)
@user_errors
def evaluate_cmd(**kw) -> None:
    """Evaluate a student on a held-out cache and/or replies; plot training curves."""
    from atkd_cache.data import DataSpec
    from atkd_cache.losses.kd import LossConfig
    from atkd_cache.train.evaluate import EvalConfig, evaluate, format_table, plot_runs

    runs, plot_output = kw.pop("plot_runs"), kw.pop("plot_output")
    if runs:
        from atkd_cache.paths import check_output_file

        check_output_file(plot_output, "--plot-output file")
        click.echo(f"plot: {plot_runs(list(runs), plot_output)}")
    if kw["model"] is None:
        if not runs:
            raise UserError("give --model (with --cache and/or --data), or --plot RUN")
        return
    caches = list(kw.pop("cache"))
    kw["cache"] = None if not caches else caches[0] if len(caches) == 1 else caches
    if kw["cache"] is None and kw["source"] is None:
        raise UserError("give --cache (held-out cache) and/or --data (replies to score)")
    from atkd_cache.paths import check_output_file

    for flag, path in (("--json", kw["json_out"]), ("--samples", kw["samples"])):
        if path:
            check_output_file(path, f"{flag} file")
    source = kw.pop("source")
    spec = None
    if source is not None:
        spec = DataSpec(source=source, split=kw.pop("split"), prompt_field=kw.pop("prompt_field"),
                        response_field=kw.pop("response_field"), template=kw.pop("template"),
                        messages_field=kw.pop("messages_field"), limit=kw.pop("gen_limit"))
    json_out = kw["json_out"]
    result = evaluate(EvalConfig(
        model=kw["model"], cache=kw["cache"], data=spec, teacher=kw["teacher"],
        tokenizer=kw["tokenizer"], device=kw["device"], batch_tokens=kw["batch_tokens"],
        limit=kw["limit"], max_new_tokens=kw["max_new_tokens"], samples_out=kw["samples"],
        trust_remote_code=kw["trust_remote_code"],
        loss=LossConfig(mix=kw["mix"], teacher_weights=parse_weights(kw["teacher_weights"])),
    ))
    if "partial" in result.get("cache_status", ""):
        click.echo(f"warning: {kw['cache']} is {result['cache_status']}: metrics cover those",
                   err=True)
    click.echo(format_table(result))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)


def config_flags(cls):
    """One --flag per field of a config dataclass, default None (the config's own default,
    or a preset's, applies); a list field takes a comma list."""

    defaults = cls()

    def add(fn):
        for f in reversed(dataclasses.fields(cls)):
            default = getattr(defaults, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(default, list):
                kind = type(default[0]) if default else str
                fn = click.option(flag, f.name, default=None, metavar="A,B,...",
                                  callback=_comma_list(kind),
                                  help=f"(default {','.join(map(str, default))})")(fn)
            else:
                fn = click.option(flag, f.name, type=type(default), default=None,
                                  help=f"(default {default!r})")(fn)
        return fn

    return add


def _comma_list(kind):
    def parse(ctx, param, text):
        if text is None:
            return None
        try:
            return [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise click.BadParameter(f"{text!r}: give {kind.__name__} values separated by "
                                     f"commas") from None

    return parse


@main.command("study")
@click.option("--demo", is_flag=True, help="The README's size: sft, kd, atkd, one seed "
                                            "(~15 minutes, in runs/demo).")
@click.option("--smoke", "--quick", "smoke", is_flag=True,
              help="Tiny sizes (~3 minutes, in <workdir>-quick).")
@config_flags(StudyConfig)
@user_errors
def study_cmd(demo: bool, smoke: bool, **values) -> None:
    """Does ATKD help? The study of docs/study.md (resumes from its results file)."""
    from atkd_cache.recipes.study import quiet_transformers, run_study

    preset = "+".join(name for name, on in (("demo", demo), ("smoke", smoke)) if on)
    quiet_transformers()
    run_study(study_config(preset, **values), log=click.echo)


@main.command("on-policy-study")
@click.option("--smoke", is_flag=True, default=False,
              help="A minute-sized run of every stage (works in <workdir>-quick).")
@click.option("--report", "report", default=None, metavar="RESULTS",
              help="Only print the report of a results file.")
@click.option("--docs", is_flag=True, default=False,
              help="With --report: also write it into its block of the docs and its "
                   "headline into the README's.")
@config_flags(OnPolicyStudyConfig)
@user_errors
def on_policy_study_cmd(smoke: bool, report: str | None, docs: bool, **values) -> None:
    """On-policy rounds vs off-policy KD: the registered comparison of docs/on-policy.md
    (resumes from its results file)."""
    from atkd_cache.recipes import on_policy_study
    from atkd_cache.recipes.study import quiet_transformers
    from atkd_cache.recipes.study_report import registered_report

    if report or docs:
        click.echo(registered_report(on_policy_study, report, docs))
        return
    quiet_transformers()
    on_policy_study.run_on_policy_study(on_policy_study_config(smoke, **values), log=click.echo)


@main.command("crosstok-study")
@click.option("--smoke", is_flag=True, default=False,
              help="A minute-sized run of every stage (works in <workdir>-quick).")
@click.option("--report", "report", default=None, metavar="RESULTS",
              help="Only print the report of a results file.")
@click.option("--docs", is_flag=True, default=False,
              help="With --report: also write it into its block of the docs and its "
                   "headline into the README's.")
@config_flags(CrossTokStudyConfig)
@user_errors
def crosstok_study_cmd(smoke: bool, report: str | None, docs: bool, **values) -> None:
    """A student with another tokenizer: CE vs ALM, ULD, GOLD from one teacher cache (the
    registered design of docs/training.md; resumes from its results file)."""
    from atkd_cache.recipes import crosstok_study
    from atkd_cache.recipes.study import quiet_transformers
    from atkd_cache.recipes.study_report import registered_report

    if report or docs:
        click.echo(registered_report(crosstok_study, report, docs))
        return
    quiet_transformers()
    crosstok_study.run_crosstok_study(crosstok_study_config(smoke, **values), log=click.echo)


@main.command("on-policy")
@click.option("--student", required=True, help="The start: an HF model folder.")
@click.option("--teacher", required=True,
              help="Teacher folder / hub id (--backend server: the served model name).")
@click.option("--data", required=True, help="Prompts (chat rows or prompt rows).")
@click.option("--output", "-o", required=True, help="Run folder (created, or resumed).")
@click.option("--messages-field", default=None, help="Chat prompts: the messages column.")
@click.option("--prompt-field", default=None, help="Prompt rows: the prompt column.")
@click.option("--template", default=None, help="Prompt template with {prompt}.")
@click.option("--max-length", type=int, default=None,
              help="Refuse prompts that leave no room for --max-new-tokens within N.")
@click.option("--rounds", type=int, default=1, show_default=True)
@click.option("--prompts-per-round", type=int, default=64, show_default=True)
@click.option("--num-responses", type=int, default=1, show_default=True,
              help="Student replies per prompt.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Student sampling temperature.")
@click.option("--rollout-backend", type=click.Choice(["hf", "vllm"]), default="hf",
              show_default=True)
@click.option("--backend", type=click.Choice(["hf", "vllm", "server"]), default="hf",
              show_default=True, help="How the teacher scores the replies.")
@click.option("--url", "urls", multiple=True, help="--backend server: a server (repeat).")
@click.option("--teacher-tokenizer", default=None,
              help="--backend server: the served teacher's tokenizer folder.")
@click.option("--top-k", type=int, default=32, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="fp32",
              show_default=True, help="Teacher weights (hf, vllm).")
@click.option("--shard-positions", type=int, default=262_144, show_default=True,
              help="Supervised positions per shard of a round's caches (under torchrun "
                   "each rank trains on its own shards).")
@click.option("--loss", type=click.Choice(LOSSES), default="kd", show_default=True,
              help="kd: forward KL over the teacher's top-k at the student's states; "
                   "rkl-tokens: the per-token reverse-KL estimator (docs/losses.md section 8).")
@click.option("--base", type=click.Choice(BASES), default="fkl", show_default=True)
@click.option("--discount", type=float, default=1.0, show_default=True,
              help="rkl-tokens: the returns' discount (1 = exact, and noisy: "
                   "docs/losses.md section 8).")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--batch-tokens", type=int, default=4096, show_default=True)
@click.option("--checkpoint-every", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--start-cache", default=None,
              help="Round 0: train on this off-policy cache first (Qwen3's recipe).")
@click.option("--start-epochs", type=int, default=1, show_default=True)
@click.option("--eval-data", default=None, help="Held-out prompts scored after every round.")
@click.option("--eval-prompts", type=int, default=64, show_default=True)
@click.option("--eval-teacher", default=None,
              help="HF-loadable teacher for evaluation (default: --teacher).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-progress", is_flag=True, default=False)
@user_errors
def on_policy_cmd(**kw) -> None:
    """On-policy distillation in rounds: the student writes, the teacher scores its exact
    tokens into a cache, the student trains on it; repeat (resumes from the run folder)."""
    from atkd_cache.losses.kd import LossConfig
    from atkd_cache.recipes.on_policy import OnPolicyConfig, run_on_policy
    from atkd_cache.recipes.study import quiet_transformers

    quiet_transformers()  # every round loads models and data: no per-load bars
    loss = LossConfig(loss=kw.pop("loss"), base=kw.pop("base"), discount=kw.pop("discount"))
    kw["progress"] = not kw.pop("no_progress")
    kw["urls"] = tuple(kw["urls"])
    run_on_policy(OnPolicyConfig(loss=loss, **kw), log=lambda m: click.echo(m, err=True))
    click.echo(f"results: {kw['output']}/results.json")


@main.command("study-report")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--v1", default="docs/study_v1_results.json", show_default=True,
              help="The first design's results file.")
@click.option("--demo", default="docs/demo_results.json", show_default=True,
              help="The demo's results file (README block).")
@click.option("--docs", is_flag=True,
              help="Also rewrite the generated blocks of docs/study.md and README.md.")
@user_errors
def study_report_cmd(results: str, v1: str, demo: str, docs: bool) -> None:
    """Print the study's report from its results file (every figure printed by code)."""
    from atkd_cache.recipes.study_report import blocks, write_docs

    click.echo(write_docs(results, v1, demo) if docs else blocks(results, v1, demo)["report"])


def run() -> None:
    """The `atkd-cache` program: run the command, shut down as the interpreter would (join
    the threads that are not daemons, run the exit handlers), then end the process at once
    with the command's exit code.

    Why not a plain return: in interpreter finalization, Python (≤ 3.13) ends every daemon
    thread that wakes up with pthread_exit, and a forced unwind through C++ frames (a torch
    op, an Arrow read, a zarr codec worker) calls std::terminate, and C++ thread pools'
    static destructors can race their own threads: the process dies with "terminate called
    without an active exception" (SIGABRT) after its work is done, more often under load
    (CI saw it after a clean one-line refusal; apache/arrow #45017 shows the same unwind).
    Skipping finalization (after everything it would do that matters: threads joined, exit
    handlers run, buffers flushed) removes that window."""
    import atexit
    import gc
    import os
    import threading

    try:
        main()  # (standalone mode: it always ends in SystemExit)
        code = 0
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):  # sys.exit("message"), as the interpreter prints it
        click.echo(code, err=True)
        code = 1
    threading._shutdown()  # non-daemon threads joined, idle executors stopped
    atexit._run_exitfuncs()  # e.g. a gloo group destroyed, zarr's IO loop stopped
    gc.collect()  # files still open but unreachable are flushed and closed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    run()
