"""On-policy distillation in rounds, with a cache in the middle (`atkd-cache on-policy`).

Round r = 1..R, on prompt slice r (rows (r-1)P .. rP-1 of the prompts):
  1. rollouts  student r-1 writes `num_responses` replies per prompt: `dump-teacher
               --generate --model STUDENT` (the same generation path as teacher-written
               replies: per-reply seeds, any backend, resumable), a cache whose target
               log-probs are the student's own (T = 1) log-probs of its sampled tokens;
  2. export    the replies as token ids (`export --format responses`);
  3. scoring   the teacher scores exactly those ids (`dump-teacher --token-ids`, any backend:
               hf, vllm, a served fleet) into round r's cache; its card's `extra.on_policy`
               records the round and the policy's weights hash;
  4. training  `train-student` from student r-1 on that cache (one epoch; checkpoints);
  5. eval      (with eval prompts) greedy replies of student r against the teacher's.
Under torchrun every rank writes its slice of the rollouts and of the scoring (the
data-parallel dump), training is data-parallel, and rank 0 alone exports, evaluates and
writes the results (the others wait at a barrier between stages).
Every stage skips what it finished and resumes what it started (the caches and the trainer
resume themselves; files are written whole and renamed), so kill -9 anywhere and re-run the
same command. With `start_cache`, round 0 first trains the student on an off-policy cache
(Qwen3's recipe: off-policy distillation first, then on-policy rounds). Every round's cache
must come from the same teacher (weights, dtype, tokenizer, served probe), else one line.

Run folder (docs/on-policy.md):
    on_policy.json   the settings (a re-run with other settings is refused; more rounds are
                     fine)
    results.json     per round: stage seconds, cache fingerprints, policy hash, metrics
    rounds.png       the metrics against rounds
    round-000/train/ the off-policy warm-up (with start_cache)
    round-NNN/       prompts.jsonl, rollouts/ (student cache), rollouts.jsonl (ids),
                     teacher/ (the round's cache), train/ (train/model = student r)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from atkd_cache.cache.reader import open_cache
from atkd_cache.data import DataSpec, generation_prompts, load_rows
from atkd_cache.dump import DumpConfig, dump_teacher
from atkd_cache.errors import UserError
from atkd_cache.fingerprint import weights_hash
from atkd_cache.losses.kd import LossConfig
from atkd_cache.recipes.files import write_json, write_jsonl_once
from atkd_cache.responses import export_responses
from atkd_cache.train import checkpoint
from atkd_cache.train.loader import LoaderConfig
from atkd_cache.train.trainer import Dist, TrainConfig, setup_distributed, train

# Settings that do not change what a round computes (a re-run may change them)
FREE = ("rounds", "progress", "device")
# Card fields that say which teacher made a cache
TEACHER_FIELDS = ("teacher_weights_hash", "teacher_dtype", "tokenizer_fingerprint",
                  "logits_width", "backend", "teacher_probe")


@dataclass
class OnPolicyConfig:
    """The loop's settings; the CLI fills it from flags."""

    student: str  # the start: any HF folder (e.g. an off-policy KD student)
    teacher: str  # a model folder / hub id, or the served model name with backend server
    data: str  # prompts: chat rows (messages_field) or prompt rows (prompt_field)
    output: str
    rounds: int = 1
    prompts_per_round: int = 64
    messages_field: str | None = None
    prompt_field: str | None = None
    template: str | None = None
    max_length: int | None = None
    # rollouts (the student samples at T = 1, so the stored log-probs are its behaviour's)
    num_responses: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    rollout_backend: str = "hf"  # hf | vllm
    # scoring
    backend: str = "hf"  # hf | vllm | server
    urls: tuple[str, ...] = ()
    teacher_tokenizer: str | None = None  # with backend server: the served model's tokenizer
    top_k: int = 32
    dtype: str = "fp32"
    shard_positions: int = 262_144  # per shard of a round's caches (>= 1 shard per rank)
    # training (one epoch per round, constant lr across rounds)
    loss: LossConfig = field(default_factory=lambda: LossConfig(loss="kd"))
    lr: float = 1e-4
    batch_tokens: int = 4096
    checkpoint_every: int = 20
    seed: int = 0
    start_cache: str | None = None  # round 0: train on this off-policy cache first
    start_epochs: int = 1
    # evaluation after every round (optional)
    eval_data: str | None = None
    eval_prompts: int = 64
    eval_teacher: str | None = None  # an HF-loadable teacher (default: teacher)
    device: str = "cpu"
    progress: bool = True

    def check(self) -> None:
        """Refuse settings that cannot work, in one line, before any work."""
        if self.rounds < 1:
            raise UserError(f"--rounds must be at least 1, got {self.rounds}")
        for name in ("prompts_per_round", "num_responses", "max_new_tokens", "batch_tokens",
                     "eval_prompts", "start_epochs", "shard_positions"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.messages_field and not self.prompt_field:
            raise UserError("give --messages-field (chat prompts) or --prompt-field")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if self.rollout_backend not in ("hf", "vllm"):
            raise UserError("--rollout-backend must be hf or vllm")
        try:
            self.loss.check()
        except ValueError as e:
            raise UserError(str(e)) from None

    def to_json(self) -> dict:
        """The settings as JSON (on_policy.json)."""
        return dataclasses.asdict(self)


def check_settings(cfg: OnPolicyConfig) -> None:
    """Create the run folder with its settings, or refuse a re-run whose settings differ."""
    path = os.path.join(cfg.output, "on_policy.json")
    mine = {k: v for k, v in cfg.to_json().items() if k not in FREE}
    if os.path.exists(path):
        with open(path) as f:
            theirs = {k: v for k, v in json.load(f).items() if k not in FREE}
        defaults = OnPolicyConfig("", "", "", "").to_json()
        for key in sorted(set(mine) | set(theirs)):
            if key not in theirs and mine[key] == defaults.get(key):
                continue  # a setting added since that run started, at its default
            if json.dumps(mine.get(key), sort_keys=True) != json.dumps(theirs.get(key),
                                                                       sort_keys=True):
                raise UserError(f"{cfg.output} was started with {key} = {theirs.get(key)!r}, "
                                f"now {mine.get(key)!r}: re-run with the same settings (only "
                                f"--rounds may grow), or use another --output")
        return
    if os.path.exists(cfg.output) and os.listdir(cfg.output):
        raise UserError(f"{cfg.output} exists and is not an on-policy run: give a new folder")
    os.makedirs(cfg.output, exist_ok=True)
    write_json(path, cfg.to_json())


def _spec(cfg: OnPolicyConfig, source: str, **kw) -> DataSpec:
    return DataSpec(source=source, messages_field=cfg.messages_field,
                    prompt_field=cfg.prompt_field, template=cfg.template,
                    max_length=cfg.max_length, **kw)


def load_prompts(cfg: OnPolicyConfig):
    """The prompt rows, refused in one line when there are too few for every round."""
    rows = load_rows(_spec(cfg, cfg.data), need_response=False)
    need = cfg.rounds * cfg.prompts_per_round
    if len(rows) < need:
        raise UserError(f"{cfg.rounds} rounds of {cfg.prompts_per_round} prompts need {need} "
                        f"prompts; {cfg.data} has {len(rows)}: lower --rounds or "
                        f"--prompts-per-round")
    return rows


def write_slices(cfg: OnPolicyConfig, rows) -> list[str]:
    """Each round's prompts as a JSONL file (written once, whole)."""
    paths = []
    for r in range(1, cfg.rounds + 1):
        folder = round_dir(cfg, r)
        os.makedirs(folder, exist_ok=True)
        lo, hi = (r - 1) * cfg.prompts_per_round, r * cfg.prompts_per_round
        paths.append(write_jsonl_once(os.path.join(folder, "prompts.jsonl"),
                                      (dict(rows[i]) for i in range(lo, hi))))
    return paths


def round_dir(cfg: OnPolicyConfig, r: int) -> str:
    return os.path.join(cfg.output, f"round-{r:03d}")


def _complete(path: str) -> bool:
    try:
        return open_cache(path, check=False).status == "complete"
    except UserError:
        return False


def train_round(cfg: OnPolicyConfig, cache: str, student: str, out: str, epochs: int = 1,
                loss: LossConfig | None = None, d: Dist | None = None) -> str:
    """Train `student` on `cache` into `out` (resuming; data-parallel under torchrun);
    returns the trained model folder."""
    d = d or Dist()
    model = os.path.join(out, "model")
    done = os.path.exists(os.path.join(out, "summary.json"))
    d.barrier()  # every rank has looked before any rank's training writes the summary
    if not done:
        train(TrainConfig(
            cache=cache, student=student, output=out, epochs=epochs, lr=cfg.lr,
            min_lr_ratio=1.0, seed=cfg.seed, resume=checkpoint.resumable(out),
            loss=loss or cfg.loss,
            loader=LoaderConfig(batch_tokens=cfg.batch_tokens, seed=cfg.seed),
            checkpoint_every=cfg.checkpoint_every, keep_checkpoints=1, device=cfg.device,
            progress=cfg.progress, tensorboard=False,
        ), log=lambda m: None)
    if d.rank == 0:
        checkpoint.drop_checkpoints(out)
    d.barrier()
    return model


def teacher_identity(card) -> dict:
    """What says which teacher made a cache (its id too, when it has no weights hash)."""
    out = {k: getattr(card, k) for k in TEACHER_FIELDS}
    if not card.teacher_weights_hash:
        out["teacher_id"] = card.teacher_id
    return out


def check_same_teacher(first: tuple[str, dict], other: tuple[str, dict]) -> None:
    """Refuse a round cache made by another teacher than the first one, naming the field."""
    for key in sorted(set(first[1]) | set(other[1])):
        if first[1].get(key) != other[1].get(key):
            raise UserError(f"{other[0]} was scored by another teacher than {first[0]} ({key} "
                            f"differs): every round must use the same teacher; re-run with "
                            f"the first round's teacher settings")


def rollout(cfg: OnPolicyConfig, r: int, student: str, prompts: str, log,
            d: Dist | None = None) -> dict:
    """Stage 1 and 2: the student's replies as a cache (each rank its slice), then as token
    ids (rank 0)."""
    d = d or Dist()
    folder = round_dir(cfg, r)
    cache = os.path.join(folder, "rollouts")
    done = _complete(cache)
    d.barrier()
    if not done:
        dump_teacher(DumpConfig(
            model=student, data=_spec(cfg, prompts), output=cache, generate=True,
            num_responses=cfg.num_responses, gen_temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 100_003 + r, top_k=1,
            shard_positions=cfg.shard_positions,
            dtype="fp32", device=cfg.device, backend=cfg.rollout_backend,
            logprob_dtype="float32", progress=cfg.progress,
            extra={"on_policy": {"round": r, "stage": "rollouts"}},
        ), log=log)
    d.barrier()  # the last rank to finish has completed the cache
    ids = os.path.join(folder, "rollouts.jsonl")
    if d.rank == 0 and not os.path.exists(ids):
        export_responses(cache, ids, progress=False)
    d.barrier()
    return {"cache": cache, "ids": ids}


def score(cfg: OnPolicyConfig, r: int, ids: str, policy_hash: str, log,
          d: Dist | None = None) -> str:
    """Stage 3: the teacher's cache of exactly the replies' ids (each rank its slice)."""
    d = d or Dist()
    out = os.path.join(round_dir(cfg, r), "teacher")
    done = _complete(out)
    d.barrier()
    if not done:
        dump_teacher(DumpConfig(
            model=cfg.teacher, tokenizer=cfg.teacher_tokenizer,
            data=DataSpec(source=ids, token_ids=True), output=out, top_k=cfg.top_k,
            shard_positions=cfg.shard_positions,
            dtype=cfg.dtype if cfg.backend != "server" else "auto", device=cfg.device,
            backend=cfg.backend, urls=tuple(cfg.urls), logprob_dtype="float32",
            progress=cfg.progress,
            extra={"on_policy": {"round": r, "policy_weights_hash": policy_hash}},
        ), log=log)
    d.barrier()
    return out


@dataclass
class EvalRefs:
    """The eval prompts and the teacher's greedy replies to them (computed once)."""

    prompts: list[list[int]]
    teacher_ids: list[list[int]]
    teacher_text: list[str]


def eval_refs(cfg: OnPolicyConfig, results: dict, tokenizer, teacher_model) -> EvalRefs:
    from atkd_cache.train.evaluate import decode_replies, generate_reply_ids

    spec = _spec(cfg, cfg.eval_data, limit=cfg.eval_prompts)
    prompts = [p for p, _ in generation_prompts(load_rows(spec, need_response=False),
                                                tokenizer, spec)]
    if "eval_reference" not in results:
        ids = generate_reply_ids(teacher_model(), tokenizer, prompts, cfg.max_new_tokens)
        results["eval_reference"] = {"teacher_ids": ids}
    ids = results["eval_reference"]["teacher_ids"]
    return EvalRefs(prompts, ids, decode_replies(tokenizer, ids))


def evaluate_student(model_path: str, refs: EvalRefs, tokenizer, teacher_model,
                     max_new_tokens: int) -> dict:
    """Greedy replies of a student: ROUGE-L against the teacher's, the teacher's log-prob of
    them, their length, stop rate and distinct 3-gram share."""
    from atkd_cache.models import load_causal_lm
    from atkd_cache.train.evaluate import reply_scores, shape_summary

    model = load_causal_lm(model_path, dtype="fp32", device="cpu").eval()
    _, _, scores = reply_scores(model, tokenizer, refs.prompts, {"teacher": refs.teacher_text},
                                max_new_tokens, teacher_model())
    return {"rouge_l_to_teacher": float(np.mean(scores["rouge_teacher"])),
            "teacher_logprob": float(np.nanmean(scores["teacher_logprob"])),
            **shape_summary(scores)}


def run_on_policy(cfg: OnPolicyConfig, log=print) -> dict:
    """Run (or resume) every round; returns the results document (results.json)."""
    from atkd_cache.models import load_causal_lm, load_tokenizer

    cfg.check()
    rows = load_prompts(cfg)
    d = setup_distributed(cfg.device)  # under torchrun: one group for every stage
    lead = d.rank == 0
    most = cfg.prompts_per_round * cfg.num_responses * cfg.max_new_tokens
    if d.world > 1 and -(-most // cfg.shard_positions) < d.world:
        raise UserError(f"a round's cache holds at most {most} reply tokens, fewer than "
                        f"{d.world} shards of --shard-positions {cfg.shard_positions}: each "
                        f"rank trains on its own shards; give --shard-positions "
                        f"{max(1, most // (2 * d.world))} or less")
    if not lead:
        log = lambda m: None  # noqa: E731
    if lead:
        check_settings(cfg)
        write_slices(cfg, rows)
    d.barrier()
    if not lead:
        check_settings(cfg)  # (reads what rank 0 wrote)
    slices = write_slices(cfg, rows)
    results_path = os.path.join(cfg.output, "results.json")
    results = {"rounds": {}}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    loaded: dict = {}

    def save() -> None:
        if lead:
            write_json(results_path, results)

    def teacher_model():
        if "m" not in loaded:
            loaded["m"] = load_causal_lm(cfg.eval_teacher or cfg.teacher, dtype="fp32",
                                         device="cpu").eval()
        return loaded["m"]

    tokenizer = load_tokenizer(cfg.student)
    refs = None
    if cfg.eval_data and lead:  # (rank 0 evaluates; the others wait at the next barrier)
        refs = eval_refs(cfg, results, tokenizer, teacher_model)
        save()

    def evaluate_round(key: str, model: str) -> None:
        entry = results["rounds"].setdefault(key, {})
        if refs is not None and "eval" not in entry:
            t0 = time.perf_counter()
            entry["eval"] = evaluate_student(model, refs, tokenizer, teacher_model,
                                             cfg.max_new_tokens)
            entry.setdefault("seconds", {})["eval"] = time.perf_counter() - t0
            save()

    # round 0: the student round 1 starts from (after the off-policy warm-up, if any)
    student = cfg.student
    teachers: list[tuple[str, dict]] = []
    if cfg.start_cache:
        start = open_cache(cfg.start_cache)
        teachers.append((cfg.start_cache, teacher_identity(start.card)))
        log(f"round 0: off-policy warm-up on {cfg.start_cache}")
        student = train_round(cfg, cfg.start_cache, student,
                              os.path.join(round_dir(cfg, 0), "train"), cfg.start_epochs, d=d)
    results["rounds"].setdefault("0", {})["student"] = student
    evaluate_round("0", student)
    for r in range(1, cfg.rounds + 1):
        entry = results["rounds"].setdefault(str(r), {})
        seconds = entry.setdefault("seconds", {})
        policy = weights_hash(student)
        t0 = time.perf_counter()
        done = rollout(cfg, r, student, slices[r - 1], log, d)
        seconds.setdefault("rollout", time.perf_counter() - t0)
        if teachers and not _complete(os.path.join(round_dir(cfg, r), "teacher")):
            # the teacher's weights can be checked before it scores anything
            now, first = weights_hash(cfg.teacher), teachers[0][1]["teacher_weights_hash"]
            if now and first and now != first:
                raise UserError(f"{cfg.teacher} is not the teacher that scored "
                                f"{teachers[0][0]} (teacher_weights_hash differs): every "
                                f"round must use the same teacher")
        t0 = time.perf_counter()
        cache_path = score(cfg, r, done["ids"], policy, log, d)
        seconds.setdefault("scoring", time.perf_counter() - t0)
        cache = open_cache(cache_path)
        mine = (cache_path, teacher_identity(cache.card))
        if teachers:
            check_same_teacher(teachers[0], mine)
        teachers.append(mine)
        t0 = time.perf_counter()
        student = train_round(cfg, cache_path, student, os.path.join(round_dir(cfg, r), "train"),
                              d=d)
        seconds.setdefault("training", time.perf_counter() - t0)
        rollouts = open_cache(done["cache"])
        entry.update(policy_weights_hash=policy, student=student,
                     teacher_cache_fingerprint=cache.card.identity,
                     rollout_cache_fingerprint=rollouts.card.identity,
                     replies=len(rollouts), teacher_tokens_scored=cache.num_supervised)
        save()
        evaluate_round(str(r), student)
        log(f"round {r}: {len(rollouts)} replies, {cache.num_supervised} tokens scored"
            + (f", ROUGE-L to teacher {results['rounds'][str(r)]['eval']['rouge_l_to_teacher']:.4f}"
               if refs is not None else ""))
    if lead:
        plot_rounds(results, os.path.join(cfg.output, "rounds.png"))
    d.barrier()
    return results


PLOT_METRICS = ("rouge_l_to_teacher", "teacher_logprob", "stop_rate", "distinct_3",
                "reply_tokens")


def plot_rounds(results: dict, output: str) -> str | None:
    """Each eval metric against the round (round 0 = the start, or the warm-up)."""
    rounds = sorted((int(k), v["eval"]) for k, v in results["rounds"].items() if "eval" in v)
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(4 * len(PLOT_METRICS), 3))
    for ax, name in zip(axes, PLOT_METRICS, strict=True):
        ax.plot([r for r, _ in rounds], [e[name] for _, e in rounds], "o-")
        ax.set_xlabel("round")
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    plt.close(fig)
    return output
