"""`dump-teacher`: data -> tokenized sequences -> teacher pass -> committed cache shards.

Sequences keep the dataset's order. They are cut into shard windows of about
`shard_positions` supervised positions; the cut points depend only on the data and the
settings, so a re-run resumes at the first window not yet committed and produces the same
shards as an uninterrupted run. Data parallel (torchrun, SLURM, or --rank/--world-size):
rank r of W runs windows r, r + W, r + 2W ... and commits them itself (cache/writer.py); the
manifest lists everything once the last rank finishes, and a rank re-run alone continues its
own windows. Every window is computed the same way whichever rank runs it, so the cache
equals a single-process one. Inside a window, sequences are sorted by length into
batches (less padding); results are put back in order before the shard is written, on a
background thread so that the teacher never waits on compression.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import numpy as np
from tqdm.auto import tqdm

from atkd_cache import __version__
from atkd_cache.cache.schema import ENCODINGS, MAX_SAMPLES, MODES, CacheCard, SequenceRecord
from atkd_cache.cache.text import text_card, tokenizer_files
from atkd_cache.cache.writer import CacheWriter, committed_prefix
from atkd_cache.data import (
    DataSpec,
    TokenizedSequence,
    TokenizeStats,
    load_rows,
    teacher_prompts,
    tokenize_rows,
)
from atkd_cache.errors import UserError
from atkd_cache.fingerprint import tokenizer_fingerprint, tokenizer_vocab_size, weights_hash
from atkd_cache.models import (
    eos_token_ids,
    load_causal_lm,
    load_tokenizer,
    logits_width,
    resolve_dtype,
)
from atkd_cache.paths import check_output_folder
from atkd_cache.split import hard_labels_np
from atkd_cache.teacher import Teacher
from atkd_cache.teacher.generate import GenerationSpec, Prompt

LABEL_RULE = "per-sequence: hard = UNC >= sorted_UNC[floor((n-1)(1-hard_ratio))]"
LOGPROB_DTYPES = ("float16", "float32")
BACKENDS = ("hf", "vllm", "server")


@dataclass
class DumpConfig:
    """Everything `dump-teacher` needs; the CLI fills it from flags."""

    model: str
    data: DataSpec
    output: str
    tokenizer: str | None = None
    revision: str | None = None
    top_k: int = 32
    hard_ratio: float = 0.5
    dtype: str = "auto"
    device: str = "cpu"
    batch_size: int | None = 8
    batch_tokens: int | None = None
    shard_positions: int = 262_144
    logprob_dtype: str = "float16"
    trust_remote_code: bool = False
    progress: bool = True
    backend: str = "hf"  # hf | vllm | server
    # --backend server: running vLLM servers (teacher/server.py); `model` is the served name
    urls: tuple[str, ...] = ()
    concurrency: int = 8
    request_timeout: float = 300.0
    retries: int = 8
    mode: str = "topk"  # topk | sampled
    num_samples: int = 50  # draws per position in sampled mode
    sample_seed: int = 0
    encoding: str = "standard"  # standard | packed
    # vLLM engine settings (ignored by the hf backend); None = vLLM's default
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    # data parallel: None = from the environment (torchrun's RANK/WORLD_SIZE, SLURM's)
    rank: int | None = None
    world_size: int | None = None
    # --generate: the teacher writes the responses (teacher/generate.py)
    generate: bool = False
    num_responses: int = 1
    gen_temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    greedy: bool = False
    seed: int = 0  # seeds every reply's token choices, per (seed, seq_id)
    # provenance for the card's `extra` (outside the fingerprint), e.g. an on-policy round
    extra: dict = field(default_factory=dict)


def rank_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's variables; (0, 1, 0) alone."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                int(env.get("SLURM_LOCALID", "0")))
    return 0, 1, 0


@dataclass
class DumpSummary:
    """What a dump did (printed as the final line)."""

    sequences: int
    tokens: int
    supervised: int
    new_sequences: int
    truncated: int
    dropped: int
    bytes: int
    seconds: float
    rank: int = 0
    world_size: int = 1
    shards_committed: int = 0
    shards_total: int = 0
    generated: bool = False  # truncated then counts this run's replies without an EOS

    @property
    def complete(self) -> bool:
        """Is every planned shard committed and listed in the manifest?"""
        return self.shards_committed == self.shards_total

    def line(self) -> str:
        """One human line: sequences, tokens, bytes on disk, bytes/token, wall time."""
        if not self.complete:
            return (
                f"rank {self.rank} of {self.world_size}: its shards are done "
                f"({self.new_sequences} sequences written in {self.seconds:.1f}s); "
                f"{self.shards_committed} of {self.shards_total} shards committed so far: the "
                f"manifest lists all of them once the other ranks finish"
            )
        per = self.bytes / max(1, self.supervised)
        return (
            f"cache: {self.sequences} sequences, {self.tokens} tokens ({self.supervised} "
            f"supervised), {self.bytes / 1e6:.2f} MB on disk, {per:.1f} bytes/supervised token; "
            f"{self.new_sequences} sequences written in {self.seconds:.1f}s; " + (
                f"{self.truncated} of them without an EOS within --max-new-tokens"
                if self.generated else
                f"{self.truncated} truncated, {self.dropped} without supervised tokens dropped")
        )


def plan_windows(seqs: list[TokenizedSequence], shard_positions: int) -> list[tuple[int, int]]:
    """Cut the sequence list into [start, end) windows of >= shard_positions supervised
    positions (the last may be smaller)."""
    windows, start, acc = [], 0, 0
    for i, s in enumerate(seqs):
        acc += int(s.supervised.sum())
        if acc >= shard_positions:
            windows.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(seqs):
        windows.append((start, len(seqs)))
    return windows


def plan_prompt_windows(
    num_prompts: int, num_responses: int, max_new_tokens: int, shard_positions: int
) -> list[tuple[int, int]]:
    """Windows of a generated cache, in reply (= cache sequence) indices: whole prompts, as
    many as fill shard_positions if every reply ran to max_new_tokens (at least one)."""
    per = max(1, shard_positions // (num_responses * max_new_tokens)) * num_responses
    total = num_prompts * num_responses
    return [(lo, min(total, lo + per)) for lo in range(0, total, per)]


def length_batches(
    lengths: list[int], batch_size: int | None, batch_tokens: int | None
) -> list[list[int]]:
    """Group indices into batches, longest first, by a sequence count or a padded-token budget
    (batch count x longest length <= batch_tokens; a longer single sequence gets its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur:
            full_by_count = batch_size is not None and len(cur) >= batch_size
            padded = (len(cur) + 1) * lengths[cur[0]]
            full_by_tokens = batch_tokens is not None and padded > batch_tokens
            if full_by_count or full_by_tokens:
                batches.append(cur)
                cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def teacher_dtype(cfg: DumpConfig) -> str:
    """The resolved weight dtype (vLLM picks its own device: CUDA when there is one)."""
    import torch

    if cfg.backend == "server":
        return "served"  # the server chose it (its log says which)
    device = cfg.device
    if cfg.backend == "vllm":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_dtype(cfg.dtype, device)


def build_card(
    cfg: DumpConfig, width: int, revision: str | None, tokenizer, data_fingerprint: str,
    planned_shards: int, generation: GenerationSpec | None = None,
    teacher_probe: list[float] | None = None,
) -> CacheCard:
    """The cache card for this configuration."""
    spec = cfg.data
    exactness = {q: "exact" for q in ("topk", "target_logprob", "entropy", "uncertainty", "hard")}
    if cfg.backend in ("vllm", "server"):  # vLLM returns only the top-k: entropy is a bound
        exactness["entropy"] = "lower_bound"
    sampled = cfg.mode == "sampled"
    if sampled:  # unbiased draws from the full distribution instead of a top-k
        del exactness["topk"]
        exactness["samples"] = "unbiased"
    if cfg.encoding == "packed":  # float mantissas rounded (schema.PACKED_KEEPBITS)
        for q in ("target_logprob", "entropy", "uncertainty") + (() if sampled else ("topk",)):
            exactness[q] = "rounded"
    card = CacheCard(
        teacher_id=cfg.model,
        teacher_revision=cfg.revision or revision,
        teacher_weights_hash=weights_hash(cfg.model),
        teacher_dtype=teacher_dtype(cfg),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        tokenizer_vocab_size=tokenizer_vocab_size(tokenizer),
        logits_width=width,
        top_k=0 if sampled else cfg.top_k,
        temperature=1.0,
        data_source=spec.source,
        data_split=spec.split,
        data_shape=spec.shape,
        data_fields=spec.fields(),
        data_template=spec.template,
        data_limit=spec.limit,
        data_fingerprint="sha256:" + data_fingerprint,
        max_length=spec.max_length,
        label_rule=LABEL_RULE,
        hard_ratio=cfg.hard_ratio,
        backend=cfg.backend,
        exactness=exactness,
        logprob_dtype=cfg.logprob_dtype,
        shard_positions=cfg.shard_positions,
        tool_version=__version__,
        mode=cfg.mode,
        num_samples=cfg.num_samples if sampled else 0,
        sample_seed=cfg.sample_seed if sampled else 0,
        encoding=cfg.encoding,
        planned_shards=planned_shards,
        generation=generation.card() if generation is not None else {},
        teacher_probe=teacher_probe or [],
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    card.format_version = card.needed_version  # plain top-k caches stay readable by v1 tools
    card.fingerprint = card.content_fingerprint()
    return card


def validate(cfg: DumpConfig) -> None:
    """Refuse impossible settings before anything expensive happens."""
    if cfg.backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    if cfg.mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.encoding not in ENCODINGS:
        raise UserError(f"--encoding must be one of {', '.join(ENCODINGS)}, got {cfg.encoding!r}")
    if cfg.mode == "sampled" and not 1 <= cfg.num_samples <= MAX_SAMPLES:
        raise UserError(f"--num-samples must be in 1..{MAX_SAMPLES}, got {cfg.num_samples}")
    if cfg.backend == "server":
        if not cfg.urls:
            raise UserError("--backend server needs --url (one per server)")
        if cfg.concurrency < 1 or cfg.retries < 1 or cfg.request_timeout <= 0:
            raise UserError("--concurrency and --retries must be >= 1, --request-timeout > 0")
    if cfg.mode == "sampled" and cfg.backend in ("vllm", "server"):
        raise UserError(
            "--mode sampled needs the full distribution, which vLLM does not return for prompt "
            "tokens: use --backend hf"
        )
    if cfg.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {cfg.top_k}")
    if not 0.0 <= cfg.hard_ratio <= 1.0:
        raise UserError(f"--hard-ratio must be in [0, 1], got {cfg.hard_ratio}")
    if cfg.logprob_dtype not in LOGPROB_DTYPES:
        raise UserError(f"--logprob-dtype must be one of {', '.join(LOGPROB_DTYPES)}")
    if cfg.batch_size is None and cfg.batch_tokens is None:
        raise UserError("give --batch-size or --batch-tokens")
    if cfg.data.max_length is not None and cfg.data.max_length < 2:
        raise UserError("--max-length must be at least 2 (one position needs two tokens)")
    rank, world, _ = resolve_rank(cfg)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"rank {rank} of world size {world}: need 0 <= rank < world size")
    if cfg.data.token_ids and (cfg.data.text_field or cfg.data.prompt_field or
                               cfg.data.response_field or cfg.data.messages_field):
        raise UserError("--token-ids reads prompt_ids/completion_ids or input_ids: drop the "
                        "--*-field options")
    if cfg.data.token_ids and cfg.generate:
        raise UserError("--token-ids scores given replies; --generate writes new ones: pass "
                        "one of them")
    if cfg.generate:  # (checks that need only the flags: before any data is read)
        if cfg.data.shape == "text":
            raise UserError("--generate needs prompts: give --prompt-field (with --template) "
                            "or --messages-field, not plain text")
        if cfg.data.shape == "prompt_response" and not cfg.data.prompt_field:
            raise UserError("--generate with prompt/response data needs --prompt-field")
        if cfg.num_responses < 1:
            raise UserError(f"--num-responses must be at least 1, got {cfg.num_responses}")
        if cfg.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}")
        if not cfg.greedy and cfg.gen_temperature <= 0:
            raise UserError(f"--gen-temperature must be > 0 (or pass --greedy), got "
                            f"{cfg.gen_temperature}")
        if not 0.0 < cfg.top_p <= 1.0:
            raise UserError(f"--top-p must be in (0, 1], got {cfg.top_p}")


def resolve_rank(cfg: DumpConfig) -> tuple[int, int, int]:
    """(rank, world size, local rank): the config's if given, else the environment's."""
    rank, world, local = rank_from_env()
    if cfg.world_size is not None:
        world = cfg.world_size
        rank = cfg.rank if cfg.rank is not None else 0
    return rank, world, local


def hf_window_outputs(
    model, seqs: list[TokenizedSequence], cfg: DumpConfig, pad_id: int, on_batch=None
) -> list[dict]:
    """HF teacher outputs for a window of sequences (length-sorted batches), in order."""
    from atkd_cache.teacher.hf import teacher_outputs

    results: list[dict | None] = [None] * len(seqs)
    lengths = [len(s.input_ids) for s in seqs]
    sampled = cfg.mode == "sampled"
    k = 0 if sampled else cfg.top_k
    n_samples = cfg.num_samples if sampled else 0
    for batch in length_batches(lengths, cfg.batch_size, cfg.batch_tokens):
        outs = teacher_outputs(
            model, [seqs[i] for i in batch], k, pad_id, n_samples, cfg.sample_seed
        )
        for i, o in zip(batch, outs, strict=True):
            results[i] = o
        if on_batch is not None:
            on_batch(sum(lengths[i] for i in batch))
    return results


def hf_window_generate(
    model, prompts: list[Prompt], cfg: DumpConfig, spec: GenerationSpec, pad_id: int,
    on_batch=None,
) -> list[tuple[TokenizedSequence, dict]]:
    """HF teacher replies for a window of prompts (batched by prompt length, whose padded
    size counts max_new_tokens), with their captured arrays, in order."""
    from atkd_cache.teacher.generate import generate_outputs

    results: list[tuple | None] = [None] * len(prompts)
    lengths = [len(p.input_ids) + spec.max_new_tokens for p in prompts]
    sampled = cfg.mode == "sampled"
    for batch in length_batches(lengths, cfg.batch_size, cfg.batch_tokens):
        outs = generate_outputs(
            model, [prompts[i] for i in batch], spec, 0 if sampled else cfg.top_k, pad_id,
            cfg.num_samples if sampled else 0, cfg.sample_seed,
        )
        for i, o in zip(batch, outs, strict=True):
            results[i] = o
        if on_batch is not None:
            on_batch(len(batch))
    return results


def records_for_window(
    seqs: list[TokenizedSequence], outputs: list[dict], hard_ratio: float
) -> list[SequenceRecord]:
    """Shard records from a backend's per-sequence outputs, with the easy/hard labels."""
    return [
        SequenceRecord(
            seq_id=s.seq_id,
            input_ids=s.input_ids,
            supervised=s.supervised,
            # UNC = 1 - exp(logp) is decreasing in logp, so splitting on -logp gives the
            # same labels without the ties float32 UNC has at 1.0 (p_g < 6e-8).
            hard=hard_labels_np(-o["target_logprob"], hard_ratio),
            **o,
        )
        for s, o in zip(seqs, outputs, strict=True)
    ]


def load_teacher(cfg: DumpConfig, pad_id: int, spec: GenerationSpec | None, tokenizer=None,
                 longest: int = 0, log=print) -> Teacher:
    """The configured backend behind the Teacher interface (teacher/__init__.py)."""
    if cfg.backend == "server":
        from atkd_cache.teacher.server import ServerConfig, ServerTeacher, served_width

        served = ServerTeacher(ServerConfig(
            urls=list(cfg.urls), model=cfg.model, top_k=cfg.top_k, concurrency=cfg.concurrency,
            timeout=cfg.request_timeout, retries=cfg.retries))
        info = served.check(tokenizer, longest, generate=spec is not None, warn=log)
        probe = [round(v, 5) for v in info.pop("probe")]
        return Teacher(score=served.score,
                       generate=lambda prompts, on_batch=None: served.generate(
                           prompts, spec, on_batch),
                       logits_width=served_width(cfg.tokenizer or cfg.model, tokenizer),
                       max_length=info.get("max_model_len"), extra={"server": info},
                       probe=probe)
    if cfg.backend == "vllm":
        from atkd_cache.teacher.vllm import VllmTeacher

        engine = VllmTeacher(
            cfg.model, cfg.top_k, teacher_dtype(cfg), tokenizer=cfg.tokenizer,
            revision=cfg.revision, tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len, gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_num_batched_tokens=cfg.max_num_batched_tokens, enforce_eager=cfg.enforce_eager,
            trust_remote_code=cfg.trust_remote_code,
        )
        return Teacher(score=engine.outputs,
                       generate=lambda prompts, on_batch=None: engine.generate(
                           prompts, spec, on_batch),
                       logits_width=engine.logits_width, max_length=engine.max_model_len)
    model = load_causal_lm(
        cfg.model, cfg.dtype, cfg.device, cfg.revision, cfg.trust_remote_code
    )
    return Teacher(
        score=lambda seqs, on_batch=None: hf_window_outputs(model, seqs, cfg, pad_id, on_batch),
        generate=lambda prompts, on_batch=None: hf_window_generate(
            model, prompts, cfg, spec, pad_id, on_batch),
        logits_width=logits_width(model),
        revision=getattr(model.config, "_commit_hash", None),
        max_length=getattr(model.config.get_text_config(), "max_position_embeddings", None),
    )


def generation_inputs(
    cfg: DumpConfig, rows, tokenizer
) -> tuple[list[Prompt], str, GenerationSpec]:
    """The replies a --generate dump writes (num_responses per prompt, seq_id = row *
    num_responses + response index), the prompts' fingerprint, and the generation spec.
    A prompt that leaves no room for max_new_tokens within --max-length is refused."""
    spec = GenerationSpec(
        num_responses=cfg.num_responses, temperature=cfg.gen_temperature, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy, seed=cfg.seed,
        # (a served model's name is no folder: its local tokenizer folder has the config)
        eos_token_ids=eos_token_ids(cfg.tokenizer or cfg.model if cfg.backend == "server"
                                    else cfg.model, tokenizer, cfg.revision),
    )
    prompts, fingerprint = teacher_prompts(rows, tokenizer, cfg.data)
    limit = cfg.data.max_length
    if limit is not None:
        row, ids = max(prompts, key=lambda p: len(p[1]))
        if len(ids) + cfg.max_new_tokens > limit:
            raise UserError(
                f"{cfg.data.source}: row {row} has a {len(ids)}-token prompt, which leaves no "
                f"room for --max-new-tokens {cfg.max_new_tokens} within --max-length {limit}: "
                f"raise --max-length, lower --max-new-tokens, or drop the long prompts"
            )
    n = cfg.num_responses
    replies = [Prompt(row * n + r, np.asarray(ids, dtype=np.int64))
               for row, ids in prompts for r in range(n)]
    return replies, fingerprint, spec


def dump_teacher(cfg: DumpConfig, log=print) -> DumpSummary:
    """Run the teacher over the data into the cache at cfg.output (resuming if it exists)."""
    validate(cfg)
    check_output_folder(cfg.output, "the cache at")
    rank, world, local_rank = resolve_rank(cfg)
    if cfg.device == "cuda" and world > 1:
        cfg = replace(cfg, device=f"cuda:{local_rank}")
    if world > 1 and cfg.backend == "vllm":
        from atkd_cache.teacher.vllm import isolate_rank

        isolate_rank(local_rank, cfg.tensor_parallel_size)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
    rows = load_rows(cfg.data, need_response=not cfg.generate)
    spec = None
    if cfg.generate:  # items are replies to write; the cache's sequences come back with them
        items, fingerprint, spec = generation_inputs(cfg, rows, tokenizer)
        stats = TokenizeStats(fingerprint=fingerprint)
        windows = plan_prompt_windows(len(items) // cfg.num_responses, cfg.num_responses,
                                      cfg.max_new_tokens, cfg.shard_positions)
    else:
        items, stats = tokenize_rows(rows, tokenizer, cfg.data)
        windows = plan_windows(items, cfg.shard_positions)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    teacher = load_teacher(cfg, pad_id, spec, tokenizer,
                           max(len(s.input_ids) for s in items) if not cfg.generate else 0, log)
    width = teacher.logits_width
    if cfg.top_k > width:
        raise UserError(
            f"--top-k {cfg.top_k} exceeds the teacher's vocabulary ({width} logits): lower it"
        )
    too_big = max(int(s.input_ids.max()) for s in items)
    if too_big >= width:
        raise UserError(
            f"token id {too_big} is outside the teacher's {width} logits: the tokenizer does "
            f"not belong to this model"
        )
    if cfg.generate and teacher.max_length:
        longest = max(len(p.input_ids) for p in items) + cfg.max_new_tokens
        if longest > teacher.max_length:
            raise UserError(
                f"the longest prompt plus --max-new-tokens {cfg.max_new_tokens} is {longest} "
                f"tokens, over the teacher's {teacher.max_length}: lower --max-new-tokens or "
                f"pass --max-length to refuse long prompts"
                + (" (or raise --max-model-len)" if cfg.backend == "vllm" else
                   " (or restart the server with a larger --max-model-len)"
                   if cfg.backend == "server" else "")
            )
    card = build_card(cfg, width, teacher.revision, tokenizer, stats.fingerprint, len(windows),
                      spec, teacher.probe)
    if teacher.extra or cfg.extra:  # provenance outside the fingerprint (which engine
        card.extra = {**card.extra, **(teacher.extra or {}), **cfg.extra}  # served it ...)

    files = tokenizer_files(tokenizer)  # the cache knows its text (cache/text.py)
    card.text = text_card(tokenizer, files)

    unfinished = 0  # replies of this run without an EOS within max_new_tokens
    with CacheWriter(cfg.output, card, rank, world, tokenizer_files=files) as writer, \
            ThreadPoolExecutor(1) as pool:
        done = {row["index"]: row for row in writer.committed}
        for i, row in done.items():
            start, end = windows[i] if i < len(windows) else (-1, -1)
            if row["first_sequence"] != start or row["num_sequences"] != end - start:
                raise UserError(
                    f"{cfg.output} has shards that do not match this run's shard plan: "
                    "use a new output folder"
                )
        todo = [i for i in range(len(windows)) if writer.owns(i) and i not in done]
        if cfg.generate:
            remaining, unit = sum(windows[i][1] - windows[i][0] for i in todo), "reply"
        else:
            remaining = sum(len(s.input_ids) for i in todo for s in items[slice(*windows[i])])
            unit = "tok"
        if done:
            mine = sum(1 for i in done if writer.owns(i))
            log(f"resuming after {len(done)} committed shards ({mine} of them this rank's)"
                if world > 1 else
                f"resuming after {len(done)} committed shards ({writer.num_committed_sequences} "
                f"sequences)")
        desc = "teacher generates" if cfg.generate else "teacher pass"
        bar = tqdm(total=remaining, unit=unit, unit_scale=not cfg.generate,
                   disable=not cfg.progress, desc=desc if world == 1 else f"{desc} (rank {rank})",
                   dynamic_ncols=True, position=rank if world > 1 else None)
        pending: Future | None = None
        for i in todo:
            start, end = windows[i]
            window = items[start:end]
            if cfg.generate:
                pairs = teacher.generate(window, bar.update)
                seqs, outputs = [q for q, _ in pairs], [o for _, o in pairs]
                unfinished += sum(int(q.input_ids[-1]) not in spec.eos_token_ids for q in seqs)
            else:
                seqs, outputs = window, teacher.score(window, bar.update)
            records = records_for_window(seqs, outputs, cfg.hard_ratio)
            if pending is not None:
                pending.result()  # at most one shard waits to be written
            pending = pool.submit(writer.write_shard, records, start, i)
        if pending is not None:
            pending.result()
        bar.close()
        writer.finish(len(windows))
        committed = writer.committed
    return DumpSummary(
        sequences=sum(r["num_sequences"] for r in committed),
        tokens=sum(r["num_tokens"] for r in committed),
        supervised=sum(r["num_supervised"] for r in committed),
        new_sequences=sum(windows[i][1] - windows[i][0] for i in todo),
        truncated=unfinished if cfg.generate else stats.truncated,
        dropped=stats.dropped_empty,
        bytes=sum(r["bytes"] for r in committed),
        seconds=time.perf_counter() - t0,
        rank=rank,
        world_size=world,
        shards_committed=len(committed_prefix(committed)),
        shards_total=len(windows),
        generated=cfg.generate,
    )
