"""`train-student`: stream a cache into a KD loss and train a Hugging Face student.

One optimizer step = `grad_accum` micro-batches per rank. Micro-batch i on a rank is weighted
by its share n_i / N of the step's supervised tokens over all ranks, so cross-entropy and
plain KD are exact token means over the whole step; ATKD (a mix of per-group means, as in the
paper) becomes the token-weighted average of its per-micro-batch values. An epoch ends for
every rank as soon as one rank has no micro-batch left (DDP needs all ranks to step); the
few left-over micro-batches are counted in the epoch's log line.

Run directory:
    run.json  metrics.jsonl  tb/  checkpoints/step-XXXXXXXX/  model/  summary.json
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from atkd_cache import __version__
from atkd_cache.cache.join import check_joinable, joined_identity
from atkd_cache.cache.reader import Cache, open_cache
from atkd_cache.cache.schema import CacheCard
from atkd_cache.errors import UserError, first_line
from atkd_cache.losses.crosstok import ChunkTeacher, crosstok_loss
from atkd_cache.losses.kd import LossConfig, SparseTeacher, is_count, kd_loss
from atkd_cache.losses.teachers import join_teachers, normalise_weights
from atkd_cache.models import load_causal_lm, load_tokenizer, logits_width
from atkd_cache.paths import check_output_folder
from atkd_cache.train import checkpoint, fsdp
from atkd_cache.train.align import cache_aligner
from atkd_cache.train.loader import (
    CacheDataset,
    Cursor,
    LoaderConfig,
    loader_settings,
    make_loader,
    plan_sizes,
    slot_count,
)
from atkd_cache.train.student import RowLogits, check_compatible, check_ids, enable_checkpointing

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    """Everything `train-student` needs; the CLI fills it from flags."""

    cache: str | list[str]  # one cache, or caches of the same data by several teachers
    student: str
    output: str
    tokenizer: str | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warmup as a share of the run's steps (used if warmup_steps is 0)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_accum: int = 1
    clip: float = 1.0  # max grad norm; 0 = no clipping
    max_steps: int | None = None
    epochs: int | None = None
    precision: str = "auto"  # bf16 autocast where the device supports it
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard the student with FSDP2 (fully_shard) instead of DDP
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    log_every: int = 1
    log_sequences: bool = False  # sequences-rank<r>.jsonl: which sequences each step used
    progress: bool = True
    tensorboard: bool = True
    trust_remote_code: bool = False
    allow_partial: bool = False  # train on the committed shards of an unfinished dump
    fused_head: bool = True  # LM head + loss fused (losses/fused.py): no [N, V] logits
    # cross-tokenizer: the student reads each chat as its own chat template renders it
    # (train/chat_render.py), not the teacher's rendering
    student_chat_template: bool = False

    def check(self) -> None:
        """Raise UserError on settings that cannot work."""
        try:
            self.loss.check()
            self.loader.check()
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.max_steps is None and self.epochs is None:
            raise UserError("give --max-steps or --epochs (or both: whichever comes first)")
        for name in ("grad_accum", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("--lr must be > 0 and --min-lr-ratio in [0, 1]")
        if self.student_chat_template and not self.loss.cross_tokenizer:
            raise UserError("--student-chat-template is for a student with another tokenizer: "
                            "give --cross-tokenizer too (a student of the teacher's tokenizer "
                            "reads the cached ids as they are)")
        if self.loss.cross_tokenizer:
            if len(cache_paths(self.cache)) > 1:
                raise UserError("--cross-tokenizer trains on one cache: give one --cache")

    def to_json(self) -> dict:
        """The config as JSON (run.json, checkpoints)."""
        return dataclasses.asdict(self)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to cfg.lr, then cosine down to cfg.lr * min_lr_ratio at `total`."""
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def barrier(self) -> None:
        """Wait for every rank (no-op alone)."""
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks, as float64 on this rank's device."""
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device).clone()
        if self.world > 1:
            dist.all_reduce(t)
        return t


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, if it still exists.

    A gloo group left to interpreter finalisation can abort the process after its work is
    done ("terminate called without an active exception", SIGABRT): its C++ threads still
    hold tensors whose release needs the GIL while Python is being torn down (pytorch
    #179291, #190489). An atexit handler runs while the interpreter is whole. Registered once
    per process; a no-op when the group was already destroyed."""
    atexit.register(_destroy_if_initialized)


def _destroy_if_initialized() -> None:
    # gloo only: destroying it is local to the process. An NCCL group's destroy can wait on
    # ranks that failed (torchtitan #1342), and NCCL groups do not abort at exit.
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


def setup_distributed(device: str) -> Dist:
    """Join the torchrun job if there is one: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world > 1:
        device = f"cuda:{local}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=None)
        destroy_process_group_at_exit()  # also when a rank fails before train()'s finally
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank=rank, world=world, device=dev)


def _autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors' bytes, in name order (as float32)."""
    digest = hashlib.sha256()
    for name, p in sorted(state.items()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def weights_sha256(model) -> str:
    """sha256 over every parameter's bytes (checks that DDP ranks ended identical)."""
    return state_sha256(model.state_dict())


def batch_teachers(batch: dict, device: torch.device) -> list[SparseTeacher]:
    """Each cache's teacher rows of a micro-batch (one per cache: the lead's arrays under
    their names, teacher i's as "teacher{i}.<name>"), on `device`, in the loss's types."""
    teachers = []
    for i in itertools.count():
        prefix = f"teacher{i}." if i else ""
        if prefix + "target_logprob" not in batch:
            return teachers

        def get(name, prefix=prefix):
            key = prefix + name if name != "target_ids" else name
            return batch[key].to(device, non_blocking=True) if key in batch else None

        sampled = prefix + "sample_ids" in batch
        teachers.append(SparseTeacher(
            topk_ids=None if sampled else get("topk_ids").long(),
            topk_logprobs=None if sampled else get("topk_logprobs").float(),
            target_ids=get("target_ids"),
            target_logprob=get("target_logprob"),
            hard=get("hard"),
            uncertainty=get("uncertainty"),
            entropy=get("entropy"),
            sample_ids=get("sample_ids").long() if sampled else None,
            sample_counts=get("sample_counts"),
        ))


def chunk_teacher(batch: dict, device: torch.device) -> ChunkTeacher:
    """A cross-tokenizer micro-batch's chunk arrays (loader.collate_aligned) on `device`."""
    def get(name):
        key = "chunk." + name
        return batch[key].to(device, non_blocking=True) if key in batch else None

    return ChunkTeacher(
        target_ids=batch["target_ids"].to(device, non_blocking=True),
        chunk_of_row=get("chunk_of_row"), teacher_ll=get("teacher_ll"),
        first_row=get("first_row"), support_logprobs=get("support_logprobs"),
        support_valid=get("support_valid"), support_student_ids=get("support_student_ids"))


def loss_weight(batch: dict) -> int:
    """What a micro-batch's loss is a mean over, so that a step's micro-batches add up to
    one mean: supervised rows, or counted chunks for a student of another tokenizer."""
    if "chunk.teacher_ll" in batch:
        return int(batch["chunk.teacher_ll"].numel())
    return int(batch["rows"].numel())


def cache_paths(cache: str | list[str] | tuple[str, ...]) -> list[str]:
    """The cache paths of a run (a run reads one cache, or several teachers' caches)."""
    return [cache] if isinstance(cache, str) else list(cache)


def sparse_teacher(batch: dict, device: torch.device, cfg: LossConfig | None = None
                   ) -> SparseTeacher:
    """The teacher a micro-batch trains on: its cache's rows, or several caches' joined as
    `cfg` says (mix, teacher_weights, hard_ratio: losses/teachers.py)."""
    teachers = batch_teachers(batch, device)
    if len(teachers) == 1:
        return teachers[0]
    cfg = cfg or LossConfig()
    return join_teachers(teachers, cfg.teacher_weights, cfg.mix, cfg.hard_ratio,
                         batch["group_offsets"].to(device))


def forward_rows(net, batch: dict, device: torch.device, **loss_kwargs):
    """Student logits at the batch's supervised rows (or, with teacher/loss_cfg/
    group_offsets, the fused head + loss: RowLogits.forward)."""
    kwargs = {
        k: batch[k].to(device, non_blocking=True)
        for k in ("attention_mask", "position_ids")
        if k in batch
    }
    return net(
        batch["input_ids"].to(device, non_blocking=True),
        batch["rows"].to(device, non_blocking=True),
        **kwargs, **loss_kwargs,
    )


def accumulate_gradients(
    net, micro: list[dict], loss_cfg: LossConfig, d: Dist, n_total: float, autocast=None,
    fused: bool = False,
) -> dict[str, float]:
    """Backward over one step's micro-batches; micro-batch i is weighted by n_i / n_total
    (its share of the step's supervised tokens on all ranks; DDP then averages over ranks,
    hence the factor world). `fused`: the LM head and the loss in one chunked pass
    (losses/fused.py). Returns this rank's share of the weighted loss parts."""
    sums: dict[str, float] = {}
    for i, b in enumerate(micro):
        n = loss_weight(b)
        last = i == len(micro) - 1
        sync = contextlib.nullcontext()
        if hasattr(net, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once per step
            net.set_requires_gradient_sync(last)
        elif d.world > 1 and not last:
            sync = net.no_sync()
        with sync:
            cross = "chunk.teacher_ll" in b  # a student of another tokenizer: chunk losses
            teacher = (chunk_teacher(b, d.device) if cross
                       else sparse_teacher(b, d.device, loss_cfg))
            offsets = None if cross else b["group_offsets"].to(d.device)
            if fused:  # LM head + loss in one pass: no [N, V] logits
                with autocast or contextlib.nullcontext():
                    out = forward_rows(net, b, d.device, teacher=teacher, loss_cfg=loss_cfg,
                                       group_offsets=offsets)
                loss, parts = out["loss"], out["parts"]
            else:
                with autocast or contextlib.nullcontext():
                    logits = forward_rows(net, b, d.device)
                out = (crosstok_loss(logits, teacher, loss_cfg) if cross
                       else kd_loss(logits, teacher, loss_cfg, group_offsets=offsets))
                loss, parts = out.loss, out.parts
            (loss * (n * d.world / n_total)).backward()
        for key, value in parts.items():
            w = 1.0 if is_count(key) else n / n_total
            sums[key] = sums.get(key, 0.0) + float(value) * w
    return sums


class RunLog:
    """metrics.jsonl + TensorBoard + progress bar, on rank 0 only."""

    def __init__(self, cfg: TrainConfig, rank: int, start: int, total: int):
        self.active = rank == 0
        self.path = os.path.join(cfg.output, "metrics.jsonl")
        self.tb = None
        self.bar = None
        if not self.active:
            return
        _truncate_jsonl(self.path, start)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.output, "tb"), purge_step=start + 1)
        if cfg.progress:
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step")

    def step(self, record: dict) -> None:
        """Append one metrics record (and mirror it to TensorBoard and the bar)."""
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if self.bar is not None:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}"
            )

    def close(self) -> None:
        """Flush and close the writers."""
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records past `last_step` (a resumed run rewrites them)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def check_same_cache(cfg: TrainConfig, fingerprint: str) -> None:
    """--resume must read the cache the run started on (same content fingerprint)."""
    try:
        with open(os.path.join(cfg.output, "run.json")) as f:
            before = json.load(f)
    except FileNotFoundError:
        return
    was = before.get("cache_fingerprint") or CacheCard.from_attrs(before["cache_card"]).identity
    if was != fingerprint:
        raise UserError(
            f"--resume: {cfg.output} was trained on cache {was} but --cache "
            f"{' --cache '.join(cache_paths(cfg.cache))} is "
            f"{fingerprint}: resume with the cache the run started on"
        )


def _prepare_output(cfg: TrainConfig, d: Dist) -> str | None:
    """Validate the run folder; returns the checkpoint to resume from (or None)."""
    run_json = os.path.join(cfg.output, "run.json")
    check_output_folder(cfg.output, "the run folder")
    if cfg.resume:
        ckpt = checkpoint.latest_checkpoint(cfg.output)
        if ckpt is None:
            raise UserError(f"--resume: {cfg.output} has no checkpoint to resume from")
        return ckpt
    if os.path.exists(run_json):
        raise UserError(
            f"{cfg.output} already holds a run: pass --resume to continue it, or choose "
            "another --output"
        )
    d.barrier()  # every rank has checked before rank 0 creates the folder
    if d.rank == 0:
        os.makedirs(cfg.output, exist_ok=True)
    d.barrier()
    return None


def is_sharded(cfg: TrainConfig, d: Dist) -> bool:
    """Does this run shard the student (FSDP on more than one rank)?"""
    return cfg.fsdp and d.world > 1


def _save_checkpoint(
    cfg, d: Dist, model, optimizer, step: int, tokens_seen: int, cursor: Cursor
) -> None:
    state = {"step": step, "tokens_seen": tokens_seen, "config": cfg.to_json()}
    tmp = checkpoint.temp_path(cfg.output, step)
    if d.rank == 0:
        checkpoint.start(cfg.output, step)
    d.barrier()
    meta = checkpoint.write_rank_rng(tmp, d.rank)
    metas = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(metas, meta)
    else:
        metas = [meta]
    gathered = None
    if is_sharded(cfg, d):  # collective: every rank takes part, rank 0 receives
        gathered = (fsdp.full_model_state(model), *fsdp.full_optimizer_state(model, optimizer))
    if d.rank == 0:
        checkpoint.write_main(tmp, model, optimizer, state, cursor, metas, gathered)
        checkpoint.commit(tmp, cfg.keep_checkpoints)
    d.barrier()


def _gather_cursor(d: Dist, epoch, slot_counts, consumed, base, cfg) -> Cursor:
    counts = d.sum(slot_counts).long().tolist()
    mask = torch.from_numpy(consumed.astype(np.uint8)).to(d.device)
    if d.world > 1:
        dist.all_reduce(mask, op=dist.ReduceOp.MAX)
    return Cursor(
        epoch=epoch, world_size=d.world, num_workers=max(1, cfg.loader.num_workers),
        slot_batches=counts, settings=loader_settings(cfg.loader),
        consumed=mask.cpu().numpy().astype(bool), base_consumed=base,
    )


def _open_sequence_log(cfg: TrainConfig, rank: int, step: int):
    if not cfg.log_sequences:
        return None
    path = os.path.join(cfg.output, f"sequences-rank{rank}.jsonl")
    _truncate_jsonl(path, step)
    return open(path, "a")  # noqa: SIM115 (closed at the end of the run)


def _steps_in_epoch(dataset: CacheDataset, accum: int) -> int:
    return min(math.ceil(b / accum) for b in plan_sizes(dataset))


def train(cfg: TrainConfig, log=print) -> dict:
    """Train a student on a cache; returns the run summary (also written to summary.json)."""
    cfg.check()
    joined = dist.is_available() and dist.is_initialized()  # a recipe's group: it keeps it
    d = setup_distributed(cfg.device)
    try:
        return _train(cfg, d, log if d.rank == 0 else (lambda m: None))
    finally:
        if d.world > 1 and dist.is_initialized() and not joined:
            dist.destroy_process_group()


def open_training_caches(cfg: TrainConfig, log) -> list[Cache]:
    """The caches to train on (the lead first), refusing an unfinished dump unless
    allow_partial (training on a prefix of the data by accident would change the experiment
    without a word) and caches that cannot be read together (cache/join.py)."""
    caches = []
    for path in cache_paths(cfg.cache):
        cache = open_cache(path, check=cfg.loader.verify_reads)
        if cache.status == "partial":
            if not cfg.allow_partial:
                raise UserError(
                    f"{path} is {cache.status_line()}: let the dump finish (re-run the same "
                    f"dump-teacher command), or pass --allow-partial to train on what is "
                    f"committed")
            log(f"warning: {path} is {cache.status_line()}; training on those (--allow-partial)")
        elif cache.status == "legacy":
            log(f"warning: {path} was written before atkd-cache recorded completion: it "
                f"cannot tell whether its dump finished")
        if len(cache) == 0:
            raise UserError(f"{path} has no committed sequences")
        caches.append(cache)
    check_joinable(caches, cfg.allow_partial)
    if len(caches) == 1 and cfg.loss.teacher_weights is not None:
        raise UserError("--teacher-weights weighs several teachers: give one --cache per "
                        "teacher, or drop --teacher-weights")
    if len(caches) > 1:
        try:
            normalise_weights(cfg.loss.teacher_weights, len(caches))
        except ValueError as e:
            raise UserError(f"--teacher-weights: {e}") from None
        ratios = sorted({c.card.hard_ratio for c in caches})
        if cfg.loss.split == "cache":  # the joined teacher is labelled by the caches' rule
            if len(ratios) > 1:
                raise UserError(
                    f"the caches were labelled at hard ratios {ratios}: choose one with "
                    f"--split-scope sequence --hard-ratio R")
            cfg.loss = dataclasses.replace(cfg.loss, hard_ratio=ratios[0])
    return caches


def _restore(cfg: TrainConfig, d: Dist, path: str, model, optimizer) -> tuple[int, int, Cursor]:
    """Load a checkpoint into the model and optimizer: (step, tokens seen, data cursor).
    A damaged checkpoint is one line (checkpoints are committed whole, so damage means the
    disk or a copy failed, not an interrupted save)."""
    try:
        state = checkpoint.read_state(path)
        checkpoint.check_files(path, state)
        checkpoint.load_into(path, state, model, optimizer, d.rank, is_sharded(cfg, d))
        return state["step"], state["tokens_seen"], checkpoint.read_cursor(path, state)
    except UserError:
        raise
    except Exception as e:  # safetensors, JSON and shape errors come in many types
        raise UserError(
            f"--resume: checkpoint {path} is damaged ({first_line(e)}): delete it to resume "
            f"from the one before, or start a new run"
        ) from None


def _check_run_fits(cfg: TrainConfig, d: Dist, caches: list[Cache]) -> None:
    """The loss suits the caches' modes and there is a shard for every loader slot."""
    cache = caches[0]
    if cfg.loss.cross_tokenizer in ("uld", "gold") and cache.card.mode == "sampled":
        raise UserError(f"{cache.path} is a sampled cache: --cross-tokenizer "
                        f"{cfg.loss.cross_tokenizer} needs the teacher's top-k (alm works "
                        f"with any cache)")
    for c in caches:
        if c.card.mode == "sampled" and not cfg.loss.cross_tokenizer:
            try:
                cfg.loss.check_sampled()
            except ValueError as e:
                raise UserError(f"{c.path} is a sampled cache: {e}") from None
    slots = slot_count(d.world, cfg.loader.num_workers)
    if len(cache.shard_rows) < slots:
        raise UserError(
            f"{cache.path} has {len(cache.shard_rows)} shards for {slots} loader slots (ranks x "
            "workers): lower --num-workers, or re-dump with a smaller --shard-positions"
        )


def _build_student(cfg: TrainConfig, d: Dist, caches: list[Cache]):
    """(tokenizer, model, the wrapped net a step calls, optimizer, logits width)."""
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student, cfg.trust_remote_code)
    # a student of another tokenizer re-tokenizes the cache's text (train/align.py); one of
    # the teacher's tokenizer is checked against every cache, before the model loads
    aligner = cache_aligner(caches[0], tokenizer, cfg.student, cfg.student_chat_template) \
        if cfg.loss.cross_tokenizer else None
    same_tokenizer = [] if aligner else caches
    for cache in same_tokenizer:
        check_compatible(cache.card, tokenizer, None, cfg.student)
    model = load_causal_lm(cfg.student, dtype="fp32", device=str(d.device),
                           trust_remote_code=cfg.trust_remote_code)
    width = logits_width(model)
    for cache in same_tokenizer:
        check_compatible(cache.card, tokenizer, width, cfg.student)
    model.train()
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    net = RowLogits(model)
    if is_sharded(cfg, d):
        net = fsdp.shard(net, model)
    elif d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[d.device.index] if d.device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=cfg.betas)
    return tokenizer, model, net, optimizer, width, aligner


def _write_run_json(cfg: TrainConfig, d: Dist, caches: list[Cache], resume_from,
                    width: int) -> None:
    if d.rank == 0:
        doc = {"config": cfg.to_json(), "world_size": d.world, "tool_version": __version__,
               "cache_fingerprint": joined_identity(caches),
               "cache_card": caches[0].card.to_attrs(), "resumed_from": resume_from,
               "student_logits_width": width}
        if len(caches) > 1:
            doc["cache_cards"] = [c.card.to_attrs() for c in caches]
        with open(os.path.join(cfg.output, "run.json"), "w") as f:
            json.dump(doc, f, indent=1)


def _planned_total(cfg: TrainConfig, dataset: CacheDataset, step: int, epoch: int) -> int:
    """The run's last step: --max-steps, or the end of --epochs if that comes first (plans
    are cheap: offsets only, no teacher arrays)."""
    total = cfg.max_steps if cfg.max_steps is not None else math.inf
    if cfg.epochs is not None:
        planned = step
        for e in range(epoch, cfg.epochs):
            dataset.set_epoch(e)
            planned += _steps_in_epoch(dataset, cfg.grad_accum)
        total = min(total, planned)
    return int(total)


def _finish(cfg: TrainConfig, d: Dist, model, tokenizer, caches: list[Cache],
            summary: dict) -> dict:
    """Digest the weights on every rank, save the student and summary.json (rank 0)."""
    weights = fsdp.full_model_state(model) if is_sharded(cfg, d) else None
    digest = weights_sha256(model) if weights is None else _state_sha256(weights, d)
    digests = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(digests, digest)
    else:
        digests = [digest]
    summary = {**summary, "cache_fingerprint": joined_identity(caches), "world_size": d.world,
               "weights_sha256": digests, "ranks_agree": len(set(digests)) == 1}
    if d.rank == 0:
        _save_student(model, tokenizer, os.path.join(cfg.output, "model"), weights)
        with open(os.path.join(cfg.output, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    d.barrier()
    return summary


def _train(cfg: TrainConfig, d: Dist, log) -> dict:
    caches = open_training_caches(cfg, log)
    cache = caches[0]
    _check_run_fits(cfg, d, caches)
    slots = slot_count(d.world, cfg.loader.num_workers)
    resume_from = _prepare_output(cfg, d)
    torch.manual_seed(cfg.seed * 1000 + d.rank)
    random.seed(cfg.seed * 1000 + d.rank)
    np.random.seed(cfg.seed * 1000 + d.rank)
    tokenizer, model, net, optimizer, width, aligner = _build_student(cfg, d, caches)

    step, tokens_seen, cursor = 0, 0, None
    if resume_from is not None:
        step, tokens_seen, cursor = _restore(cfg, d, resume_from, model, optimizer)
        log(f"resuming from {resume_from} (step {step}, epoch {cursor.epoch})")
        check_same_cache(cfg, joined_identity(caches))
    _write_run_json(cfg, d, caches, resume_from, width)

    dataset = CacheDataset(cache_paths(cfg.cache), cfg.loader, d.rank, d.world, resume=cursor,
                           aligner=aligner)
    epoch = cursor.epoch if cursor else 0
    total = _planned_total(cfg, dataset, step, epoch)
    run_log = RunLog(cfg, d.rank, step, total)
    autocast = _autocast(cfg, d.device)
    seq_log = _open_sequence_log(cfg, d.rank, step)
    last_saved = step if resume_from else -1
    t_start = t_log = time.perf_counter()
    tokens_since_log = 0.0

    # Where this rank is in the current epoch (what a checkpoint's cursor is made of).
    def epoch_state(e: int):
        dataset.set_epoch(e)
        resumed = cursor is not None and cursor.epoch == e
        replay = resumed and dataset.resume_mode() == "replay"
        counts = list(cursor.slot_batches) if replay else [0] * slots
        used = cursor.consumed.copy() if resumed else np.zeros(len(cache), bool)
        return counts, used, dataset.base_consumed()

    slot_counts, consumed, base = epoch_state(epoch)
    while step < total and (cfg.epochs is None or epoch < cfg.epochs):
        batches = iter(make_loader(dataset, pin_memory=d.device.type == "cuda"))
        left_over = 0
        while step < total:
            micro = list(itertools.islice(batches, cfg.grad_accum))
            damaged = next((b["error"] for b in micro if "error" in b), None)
            micro = [b for b in micro if "error" not in b]
            n_local = [loss_weight(b) for b in micro]
            max_id = max((int(b["max_id"]) for b in micro), default=0)
            have, n_total, padded, real, bad, broken = d.sum([
                float(len(micro) > 0), float(sum(n_local)),
                float(sum(b["input_ids"].numel() for b in micro)),
                float(sum(int(b["real_tokens"]) for b in micro)), float(max_id >= width),
                float(damaged is not None),
            ]).tolist()
            if broken:  # a damaged shard: every rank stops before a step uses any of it
                raise UserError(damaged or "another rank found a damaged cache shard (see its "
                                "message)")
            if bad:  # every rank stops, not only the one that saw the id
                check_ids(max_id, width, cfg.student)
                raise UserError(f"another rank found a token id outside the student's {width} "
                                "logits (see its message)")
            if have < d.world:  # some rank ran out: the epoch ends for all
                left_over = len(micro)
                break
            lr = lr_at(step, cfg, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = accumulate_gradients(net, micro, cfg.loss, d, n_total, autocast,
                                        fused=cfg.fused_head)
            norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.clip if cfg.clip > 0 else math.inf
            )
            if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
                norm = norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(n_total)
            tokens_since_log += n_total
            for b in micro:
                slot_counts[int(b["slot"])] += 1
                consumed[b["seq_index"].numpy()] = True
            if seq_log is not None:
                ids = [int(i) for b in micro for i in b["seq_index"]]
                seq_log.write(json.dumps({"step": step, "epoch": epoch, "seq_index": ids}) + "\n")
                seq_log.flush()
            keys = sorted(sums)
            reduced = d.sum([sums[k] for k in keys]).tolist()
            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                run_log.step({
                    "step": step, "epoch": epoch, "lr": lr, "grad_norm": float(norm),
                    **dict(zip(keys, reduced, strict=True)),
                    "supervised_tokens": int(n_total), "tokens_seen": tokens_seen,
                    "padding": 1 - real / max(padded, 1.0),
                    "tokens_per_s": tokens_since_log / max(now - t_log, 1e-9),
                    "elapsed_s": now - t_start,
                })
                t_log, tokens_since_log = now, 0.0
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                cur = _gather_cursor(d, epoch, slot_counts, consumed, base, cfg)
                _save_checkpoint(cfg, d, model, optimizer, step, tokens_seen, cur)
                last_saved = step
        del batches
        if step >= total and left_over == 0:
            break
        log(f"epoch {epoch} ended at step {step} with {int(consumed.sum())}/{len(cache)} "
            f"sequences seen by rank {d.rank}; {left_over} micro-batch(es) left over there")
        epoch += 1
        cursor = None
        dataset.resume = None
        slot_counts, consumed, base = epoch_state(epoch)

    if seq_log is not None:
        seq_log.close()
    run_log.close()
    if step != last_saved:
        cur = _gather_cursor(d, epoch, slot_counts, consumed, base, cfg)
        _save_checkpoint(cfg, d, model, optimizer, step, tokens_seen, cur)
    return _finish(cfg, d, model, tokenizer, caches, {
        "steps": step, "epochs_started": epoch + 1, "tokens_seen": tokens_seen,
        "seconds": time.perf_counter() - t_start})


def _state_sha256(weights: dict[str, torch.Tensor], d: Dist) -> str:
    """weights_sha256 of gathered weights (on rank 0), shared with every rank."""
    digest = [state_sha256(weights) if d.rank == 0 else None]
    dist.broadcast_object_list(digest, src=0)
    return digest[0]


def _save_student(model, tokenizer, folder: str, weights: dict | None = None) -> None:
    """save_pretrained + tokenizer into a temp folder, then rename (all or nothing).
    `weights`: the gathered weights of a sharded model (saved through a plain copy)."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if weights is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(model.config)
        model.load_state_dict(weights, strict=False)
        model.tie_weights()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
