"""`evaluate`: a student against a held-out cache (and optionally against reference replies).

On the cache's supervised tokens:
  nll / perplexity   -log q(y_t), averaged; perplexity = exp(nll)
  top1_agreement     argmax q == the teacher's top-1 id
  kl_to_teacher      bucketed KL(p || q) over top-k ∪ {target} + tail (a lower bound of the
                     full KL, exact when the cache holds the whole vocabulary; docs/losses.md)
  *_easy / *_hard    nll and kl over the cache's easy and hard tokens (its `hard` labels)
  accuracy / ece     top-1 accuracy against y_t and its expected calibration error
                     (15 equal-width confidence bins, weighted by bin size)
The teacher's own nll, accuracy and ECE come from the cache itself (its target log-prob and
top-1 entry), so the table compares student and teacher without loading the teacher.
On prompt/response or chat data: greedy replies scored by ROUGE-L F1 (Google's rouge-score
package, with stemming) against the references; with a teacher, also against the teacher's
own greedy replies (rouge_l_to_teacher), and teacher_logprob: the teacher's mean log-prob per
token of the student's reply (its tokens up to and including EOS), averaged over prompts.
What a reply's shape says (the failures the study found: replies that loop and never stop),
for the student and the teacher alike:
  reply_tokens       generated tokens per reply (an EOS that ends it included)
  stop_rate          share of replies that end with an EOS within --max-new-tokens
  distinct_3         distinct 3-gram share of a reply's tokens (distinct / all 3-grams, EOS
                     excluded; 1 = no 3-gram repeats, a loop drives it towards 0), averaged
                     over replies of >= 3 tokens
--samples writes, per prompt, the replies as text and as token ids (`<role>_ids`), so every
one of these can be recomputed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from atkd_cache.cache.join import check_joinable
from atkd_cache.cache.reader import open_cache
from atkd_cache.data import DataSpec, generation_prompts, load_rows
from atkd_cache.errors import UserError
from atkd_cache.losses.kd import LossConfig, SparseTeacher, row_terms
from atkd_cache.losses.teachers import normalise_weights
from atkd_cache.models import load_causal_lm, load_tokenizer, logits_width, resolve_device
from atkd_cache.teacher.hf import left_pad
from atkd_cache.train.loader import CacheDataset, LoaderConfig, make_loader, raise_on_error
from atkd_cache.train.student import RowLogits, check_ids
from atkd_cache.train.trainer import batch_teachers, forward_rows, sparse_teacher

ECE_BINS = 15


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width confidence bins of
    |accuracy - mean confidence| weighted by the bin's share of predictions."""
    if len(confidence) == 0:
        return float("nan")
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(total)


@dataclass
class _Tally:
    """Per-token values collected over the evaluation."""

    nll: list
    conf: list
    correct: list
    agree: list
    hard: list
    kl: list

    @classmethod
    def empty(cls) -> _Tally:
        return cls([], [], [], [], [], [])

    def add(self, nll, conf, correct, agree, hard, kl) -> None:
        for store, value in zip(
            (self.nll, self.conf, self.correct, self.agree, self.hard, self.kl),
            (nll, conf, correct, agree, hard, kl), strict=True,
        ):
            store.append(value.detach().float().cpu().numpy())

    def summary(self) -> dict[str, float]:
        nll, conf, correct, agree, hard, kl = (np.concatenate(x) for x in (
            self.nll, self.conf, self.correct, self.agree, self.hard, self.kl))
        hard = hard.astype(bool)
        return {
            "kl_to_teacher": float(kl.mean()),
            "kl_hard": float(kl[hard].mean()) if hard.any() else float("nan"),
            "kl_easy": float(kl[~hard].mean()) if (~hard).any() else float("nan"),
            "nll": float(nll.mean()),
            "perplexity": float(math.exp(nll.mean())),
            "nll_hard": float(nll[hard].mean()) if hard.any() else float("nan"),
            "nll_easy": float(nll[~hard].mean()) if (~hard).any() else float("nan"),
            "accuracy": float(correct.mean()),
            "ece": ece(conf, correct.astype(bool)),
            "top1_agreement": float(agree.mean()),
        }


def teacher_top1(t: SparseTeacher) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's most probable id and its probability, over its top-k and the target
    (a joined teacher's columns are not sorted); for a sampled cache, the most drawn id and
    its share of the draws (an estimate)."""
    if not t.sampled:
        lp = torch.where(t.topk_ids == t.target_ids[:, None], float("-inf"),
                         t.topk_logprobs.float())
        best, col = lp.max(dim=1)
        target = t.target_logprob.float()
        is_target = target > best
        top_id = torch.where(is_target, t.target_ids, t.topk_ids.gather(1, col[:, None])[:, 0])
        return top_id, torch.exp(torch.maximum(target, best))
    counts = t.sample_counts.float()
    best, col = counts.max(dim=1)
    return t.sample_ids.gather(1, col[:, None])[:, 0], best / counts.sum(1).clamp(min=1.0)


def open_eval_caches(paths: list[str], loss_cfg: LossConfig | None):
    """The caches to evaluate on, refused in one line when they cannot be read together
    (other data, tokenizers; a teacher weight per cache), and the loss config that joins
    them (labelled at the first cache's hard ratio, as dump-teacher labels a cache)."""
    caches = [open_cache(p) for p in paths]
    check_joinable(caches)
    if len(caches) > 1:
        try:
            normalise_weights((loss_cfg or LossConfig()).teacher_weights, len(caches))
        except ValueError as e:
            raise UserError(f"--teacher-weights: {e}") from None
        loss_cfg = dataclasses.replace(loss_cfg or LossConfig(),
                                       hard_ratio=caches[0].card.hard_ratio)
    return caches, loss_cfg


@torch.no_grad()
def cache_metrics(
    model, cache: str | list[str], device: str = "cpu", batch_tokens: int = 8192,
    limit: int | None = None, name: str = "student", loss_cfg: LossConfig | None = None,
) -> dict:
    """Student and teacher metrics over the (first `limit`) sequences of a cache. Several
    caches (teachers of the same data): "student"/"teacher" are against the teachers joined
    as `loss_cfg` says (mix, weights), and "per_teacher" holds the student's agreement and
    KL to each teacher and that teacher's own NLL and accuracy."""
    net = RowLogits(model).eval()
    width = logits_width(model)
    paths = [cache] if isinstance(cache, str) else list(cache)
    caches, loss_cfg = open_eval_caches(paths, loss_cfg)
    dataset = CacheDataset(paths, LoaderConfig(batch_tokens=batch_tokens, shuffle=False,
                                               num_workers=0))
    student, teacher = _Tally.empty(), _Tally.empty()
    each = [_Tally.empty() for _ in paths] if len(paths) > 1 else []
    own = [_Tally.empty() for _ in each]
    tokens, sequences = 0, 0
    dev = torch.device(device)
    for batch in raise_on_error(make_loader(dataset)):
        if limit is not None and sequences >= limit:
            break
        check_ids(int(batch["max_id"]), width, name)
        t = sparse_teacher(batch, dev, loss_cfg)
        logits = forward_rows(net, batch, dev).float()
        lse = torch.logsumexp(logits, dim=-1)
        top, pred = logits.max(dim=-1)
        target_logit = logits.gather(1, t.target_ids[:, None])[:, 0]
        top1_id, top1_p = teacher_top1(t)
        kl = row_terms(logits, t, LossConfig(loss="kd", base="fkl"))["fkl"]
        student.add(lse - target_logit, torch.exp(top - lse), pred == t.target_ids,
                    pred == top1_id, t.hard, kl)
        teacher.add(-t.target_logprob, top1_p, top1_id == t.target_ids,
                    torch.ones_like(t.hard), t.hard, torch.zeros_like(kl))
        for tally, mine, ti in zip(each, own, batch_teachers(batch, dev), strict=False):
            ti_id, ti_p = teacher_top1(ti)
            ti_kl = row_terms(logits, ti, LossConfig(loss="kd", base="fkl"))["fkl"]
            tally.add(lse - target_logit, torch.exp(top - lse), pred == t.target_ids,
                      pred == ti_id, ti.hard, ti_kl)
            mine.add(-ti.target_logprob, ti_p, ti_id == t.target_ids, ti_id == top1_id,
                     ti.hard, torch.zeros_like(kl))
        tokens += logits.shape[0]
        sequences += len(batch["seq_index"])
    if tokens == 0:
        return {"tokens": 0}
    out = {"tokens": tokens, "sequences": sequences, "student": student.summary(),
           "teacher": teacher.summary(), "cache_status": dataset.cache.status_line()}
    if each:
        out["per_teacher"] = [
            {"cache": path,
             "student_kl_to_teacher": s["kl_to_teacher"],
             "student_top1_agreement": s["top1_agreement"],
             "teacher_nll": o["nll"], "teacher_accuracy": o["accuracy"],
             "teacher_top1_agreement_with_joined": o["top1_agreement"]}
            for path, s, o in zip(paths, (x.summary() for x in each),
                                  (x.summary() for x in own), strict=True)]
    return out


@torch.no_grad()
def bits_per_byte(model, cache_path: str, aligner, batch_size: int = 16) -> dict:
    """Bits per byte of a cache's supervised text under a student of any tokenizer, the
    comparable measure across vocabularies: over the chunks that count (train/align.py),
    -sum log2 q(the student's tokens) / their bytes; beside it the teacher's own bits per
    byte of the same chunks (its cached target log-probs)."""
    from atkd_cache.cache.reader import open_cache
    from atkd_cache.train.loader import collate_aligned
    from atkd_cache.train.student import RowLogits

    net = RowLogits(model)
    device = next(model.parameters()).device
    nats = teacher_nats = 0.0
    n_bytes = n_chunks = 0
    for seqs in open_cache(cache_path).batches(batch_size):
        b = collate_aligned(seqs, [aligner.align(s) for s in seqs], False, aligner.vocab_map)
        if not b["rows"].numel():
            continue
        logits = net(b["input_ids"].to(device), b["rows"].to(device),
                     attention_mask=b["attention_mask"].to(device)).float()
        target = b["target_ids"].to(device)
        nats -= float((logits.gather(1, target[:, None])[:, 0]
                       - torch.logsumexp(logits, -1)).sum())
        teacher_nats -= float(b["chunk.teacher_ll"].sum())
        n_bytes += int(b["chunk.bytes"].sum())
        n_chunks += int(b["chunk.teacher_ll"].numel())
    ln2 = math.log(2)
    return {"bits_per_byte": nats / ln2 / max(n_bytes, 1),
            "teacher_bits_per_byte": teacher_nats / ln2 / max(n_bytes, 1),
            "bytes": n_bytes, "chunks": n_chunks}


def stop_ids(model, tokenizer) -> set[int]:
    """The ids that end a reply: the model's generation EOS ids and the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    ids = set([eos] if isinstance(eos, int) else list(eos or []))
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def generate_reply_ids(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64, batch_size: int = 8,
    device: str = "cpu",
) -> list[list[int]]:
    """Greedy replies (left-padded batches) as token ids, up to and including the first EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = stop_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad)
        width = ids.shape[1]
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=pad,
        )
        for row, i in enumerate(idx):
            reply = gen[row, width:].tolist()
            end = next((j for j, t in enumerate(reply) if t in stop), len(reply) - 1)
            out[i] = reply[: end + 1]
    return [out[i] for i in range(len(prompts))]


def distinct_ngram_share(ids: list[int], n: int = 3) -> float:
    """Distinct n-grams / all n-grams of a token sequence; NaN when it has none."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def reply_shape(replies: list[list[int]], stop_ids: set[int]) -> dict[str, list[float]]:
    """Per reply (token ids as generated, up to and including a stop id): its length, whether
    it stopped (ends with a stop id), and its distinct 3-gram share without the stop id."""
    stopped = [bool(r) and r[-1] in stop_ids for r in replies]
    return {"reply_tokens": [float(len(r)) for r in replies],
            "stopped": [float(s) for s in stopped],
            "distinct_3": [distinct_ngram_share(r[:-1] if s else r)
                           for r, s in zip(replies, stopped, strict=True)]}


def reply_scores(
    model, tokenizer, prompts: list[list[int]], references: dict[str, list[str]],
    max_new_tokens: int, teacher=None, batch_size: int = 8,
) -> tuple[list[list[int]], list[str], dict[str, list[float]]]:
    """A model's greedy replies to `prompts` (ids and text) and, per prompt: ROUGE-L F1
    against each named list of references (`rouge_<name>`), the reply's shape (reply_shape),
    and with `teacher` loaded, its mean log-prob per token of the reply (`teacher_logprob`)."""
    ids = generate_reply_ids(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    text = decode_replies(tokenizer, ids)
    scores = {f"rouge_{name}": rouge_l_scores(text, refs) for name, refs in references.items()}
    scores.update(reply_shape(ids, stop_ids(model, tokenizer)))
    if teacher is not None:
        scores["teacher_logprob"] = reply_logprobs(teacher, prompts, ids)
    return ids, text, scores


def shape_summary(shape: dict[str, list[float]]) -> dict[str, float]:
    """Means over replies: reply_tokens, stop_rate, distinct_3 (over replies that have one)."""
    distinct = [v for v in shape["distinct_3"] if not math.isnan(v)]
    return {"reply_tokens": float(np.mean(shape["reply_tokens"])),
            "stop_rate": float(np.mean(shape["stopped"])),
            "distinct_3": float(np.mean(distinct)) if distinct else float("nan")}


def decode_replies(tokenizer, replies: list[list[int]]) -> list[str]:
    """Reply ids as text, without special tokens."""
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]


def generate_replies(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64, batch_size: int = 8,
    device: str = "cpu",
) -> list[str]:
    """Greedy replies (left-padded batches), decoded without special tokens."""
    return decode_replies(tokenizer, generate_reply_ids(model, tokenizer, prompts,
                                                        max_new_tokens, batch_size, device))


@torch.no_grad()
def reply_logprobs(
    model, prompts: list[list[int]], replies: list[list[int]], device: str = "cpu",
    batch_size: int = 16,
) -> list[float]:
    """Per reply, the model's mean log-prob per token of the reply given its prompt
    (teacher-forced, float32 log_softmax); NaN for an empty reply. Batched: prompt + reply
    right-padded under an attention mask (a causal model's earlier positions never see the
    padding), batches of similar length."""
    out = [float("nan")] * len(prompts)
    todo = sorted((i for i, r in enumerate(replies) if r),
                  key=lambda i: len(prompts[i]) + len(replies[i]))
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        seqs = [prompts[i] + replies[i] for i in idx]
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, i in enumerate(idx):
            p, n = len(prompts[i]), len(replies[i])
            lp = torch.log_softmax(logits[row, p - 1 : p - 1 + n].float(), -1)
            target = ids[row, p : p + n].to(lp.device)
            out[i] = float(lp.gather(1, target[:, None]).mean())
    return out


def rouge_l_scores(replies: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each reply against its reference (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(
        replies, references, strict=True)]


def rouge_l(replies: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, Porter stemming)."""
    scores = rouge_l_scores(replies, references)
    return float(np.mean(scores)) if scores else float("nan")


@dataclass
class EvalConfig:
    """What `evaluate` measures; the CLI fills it from flags."""

    model: str
    cache: str | list[str] | None = None  # several: teachers of the same data, joined by `loss`
    data: DataSpec | None = None  # prompt/response or chat data for ROUGE-L
    teacher: str | None = None  # also generate with the teacher for its ROUGE-L
    tokenizer: str | None = None
    device: str = "auto"
    batch_tokens: int = 8192
    limit: int | None = None  # sequences of the cache
    max_new_tokens: int = 64
    gen_batch_size: int = 8
    samples_out: str | None = None  # JSONL of prompts, replies and references
    trust_remote_code: bool = False
    loss: LossConfig | None = None  # several caches: mix and teacher_weights


def evaluate(cfg: EvalConfig) -> dict:
    """Run the configured evaluations; returns {"student": {...}, "teacher": {...}, ...}."""
    cfg.device = resolve_device(cfg.device)
    if cfg.cache:  # refuse caches that cannot be read together before any model loads
        open_eval_caches([cfg.cache] if isinstance(cfg.cache, str) else list(cfg.cache),
                         cfg.loss)
    model = load_causal_lm(cfg.model, dtype="fp32", device=cfg.device,
                           trust_remote_code=cfg.trust_remote_code)
    result: dict = {"model": cfg.model, "student": {}, "teacher": {}}
    if cfg.cache:
        m = cache_metrics(model, cfg.cache, cfg.device, cfg.batch_tokens, cfg.limit, cfg.model,
                          cfg.loss)
        result["cache"] = cfg.cache
        result["tokens"] = m["tokens"]
        result["cache_status"] = m.get("cache_status", "")
        result["student"].update(m.get("student", {}))
        result["teacher"].update(m.get("teacher", {}))
        if "per_teacher" in m:
            result["per_teacher"] = m["per_teacher"]
    if cfg.data is not None:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code)
        pairs = generation_prompts(load_rows(cfg.data), tokenizer, cfg.data)
        prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
        samples = {"reference": refs}
        reply_ids, models = {}, {"student": model}
        if cfg.teacher is not None:
            models["teacher"] = load_causal_lm(cfg.teacher, dtype="fp32", device=cfg.device,
                                               trust_remote_code=cfg.trust_remote_code)
        for role, lm in models.items():
            reply_ids[role] = generate_reply_ids(lm, tokenizer, prompts, cfg.max_new_tokens,
                                                 cfg.gen_batch_size, cfg.device)
            replies = decode_replies(tokenizer, reply_ids[role])
            result[role]["rouge_l"] = rouge_l(replies, refs)
            result[role].update(shape_summary(reply_shape(reply_ids[role],
                                                          stop_ids(lm, tokenizer))))
            samples[role] = replies
            samples[f"{role}_ids"] = reply_ids[role]
        if cfg.teacher is not None:  # the student's replies against the teacher's
            result["student"]["rouge_l_to_teacher"] = rouge_l(samples["student"],
                                                              samples["teacher"])
            teacher = models["teacher"]
            scores = reply_logprobs(teacher, prompts, reply_ids["student"], cfg.device)
            result["student"]["teacher_logprob"] = float(np.nanmean(scores))
            own = reply_logprobs(teacher, prompts, reply_ids["teacher"], cfg.device)
            result["teacher"]["teacher_logprob"] = float(np.nanmean(own))  # the ceiling
            samples["teacher_logprob_of_student"] = scores
        result["generations"] = len(prompts)
        if cfg.samples_out:
            with open(cfg.samples_out, "w") as f:
                for i, ids in enumerate(prompts):
                    row = {"prompt": tokenizer.decode(ids), **{k: v[i] for k, v in samples.items()}}
                    f.write(json.dumps(row) + "\n")
    return result


def format_table(result: dict) -> str:
    """Metrics as an aligned text table: one row per metric, student and teacher columns."""
    keys = list(dict.fromkeys([*result.get("student", {}), *result.get("teacher", {})]))
    lines = [f"{'metric':18s} {'student':>12s} {'teacher':>12s}"]
    for key in keys:
        cells = []
        for role in ("student", "teacher"):
            v = result.get(role, {}).get(key)
            cells.append(f"{v:12.5g}" if isinstance(v, float) else f"{'-':>12s}")
        lines.append(f"{key:18s} {cells[0]} {cells[1]}")
    for i, row in enumerate(result.get("per_teacher", [])):
        lines.append(f"teacher {i} ({row['cache']}): student KL {row['student_kl_to_teacher']:.5g}"
                     f", agreement {row['student_top1_agreement']:.5g}; its nll "
                     f"{row['teacher_nll']:.5g}, accuracy {row['teacher_accuracy']:.5g}")
    return "\n".join(lines)


PLOT_KEYS = ("loss", "ce", "lr", "grad_norm", "tokens_per_s")


def plot_runs(run_dirs: list[str], output: str, labels: list[str] | None = None) -> str:
    """PNG of training curves (loss, cross-entropy, lr, grad norm, tokens/s vs step) read from
    each run's metrics.jsonl, one line per run (labelled by its folder name unless given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOT_KEYS), figsize=(4 * len(PLOT_KEYS), 3.2))
    labels = labels or [os.path.basename(os.path.normpath(run)) for run in run_dirs]
    for run, label in zip(run_dirs, labels, strict=True):
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.exists(path):
            raise UserError(f"{run} has no metrics.jsonl: give a train-student output folder")
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        steps = [r["step"] for r in records]
        for ax, key in zip(axes, PLOT_KEYS, strict=True):
            ax.plot(steps, [r.get(key, float("nan")) for r in records], label=label)
    for ax, key in zip(axes, PLOT_KEYS, strict=True):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
