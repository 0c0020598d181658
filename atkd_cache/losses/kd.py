"""`kd_loss`: one entry point for ATKD, plain divergences and cross-entropy over a cached
sparse teacher (formulas in docs/losses.md, DESIGN §3-§4).

ATKD (Zhong et al., ACL 2024; official code WHU-ZQH/ATKD):
    TKD = D(b_P, b_Q)   with b = (mass of the target, mass of everything else)
    DKD = D(P^, Q^)     with P^ = P without the target, renormalised (same for Q)
    L   = alpha * mean_easy(DKD) + (1 - alpha) * mean_hard(TKD + DKD)   (+ ce_weight * CE)
For D = KL: KL(P || Q) = TKD + (1 - p_g) DKD exactly, also for the bucketed distributions.
A sampled teacher (sample_ids/sample_counts instead of a top-k) goes through
losses/sampled.py: forward KL, CE and ATKD over forward KL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atkd_cache.losses.bucket import BucketedPair, bucketize
from atkd_cache.losses.divergences import DIVERGENCES, divergence
from atkd_cache.losses.names import CROSS_TOKENIZER, LOSSES, MIXES, SPLITS
from atkd_cache.losses.onpolicy import rkl_token_weights
from atkd_cache.losses.sampled import sampled_terms
from atkd_cache.split import hard_labels, hard_labels_grouped


@dataclass
class SparseTeacher:
    """What the cache holds for N supervised positions (rows aligned with the student's):
    a top-k teacher (topk_ids/topk_logprobs) or a sampled one (sample_ids/sample_counts,
    padded per row with count 0, and the entropy)."""

    topk_ids: torch.Tensor | None  # [N, k] long
    topk_logprobs: torch.Tensor | None  # [N, k]
    target_ids: torch.Tensor  # [N] long
    target_logprob: torch.Tensor  # [N]
    hard: torch.Tensor | None = None  # [N] bool, the cache's labels
    uncertainty: torch.Tensor | None = None  # [N], 1 - p(target)
    entropy: torch.Tensor | None = None  # [N], needed by sampled losses' values
    sample_ids: torch.Tensor | None = None  # [N, U] long
    sample_counts: torch.Tensor | None = None  # [N, U], 0 = padding

    @property
    def sampled(self) -> bool:
        """Is this a sampled teacher (not a top-k one)?"""
        return self.sample_ids is not None


@dataclass
class LossConfig:
    """Which loss and its knobs (defaults are the paper's / official code's)."""

    loss: str = "atkd"  # atkd | kd (a plain divergence) | ce | rkl-tokens (on-policy)
    base: str = "fkl"  # fkl | rkl | jsd | tvd | skl | srkl
    alpha: float = 0.2  # ATKD weight of the easy tokens' DKD
    beta: float = 0.5  # jsd
    skew: float = 0.1  # skl / srkl
    tail: str = "bucket"  # bucket | renorm
    ce_weight: float = 0.0
    temperature: float = 1.0  # teacher temperature (re-tempered on the support)
    split: str = "cache"  # cache labels | re-split per sequence | per batch
    hard_ratio: float = 0.5  # rho, for split = sequence | batch
    chunk_rows: int | None = None
    # several teachers (losses/teachers.py): how they join, and their weights (None: equal)
    mix: str = "mixture"
    teacher_weights: tuple[float, ...] | None = None
    # rkl-tokens (losses/onpolicy.py): the discount of the per-token terms' returns (1: the
    # exact sequence-level reverse-KL gradient; 0: tinker-cookbook's frozen-prefix form)
    discount: float = 1.0
    # a student of another tokenizer (losses/crosstok.py): "" (same tokenizer) | alm | uld |
    # gold; ALM's temperature on the chunk log-likelihoods
    cross_tokenizer: str = ""
    chunk_temperature: float = 1.0

    def check(self) -> None:
        """Raise ValueError on an unknown or out-of-range setting."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.base not in DIVERGENCES:
            raise ValueError(f"base must be one of {', '.join(DIVERGENCES)}, got {self.base!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        for name in ("alpha", "beta", "skew", "hard_ratio", "discount"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.cross_tokenizer and self.cross_tokenizer not in CROSS_TOKENIZER:
            raise ValueError(f"cross_tokenizer must be one of {', '.join(CROSS_TOKENIZER)}, "
                             f"got {self.cross_tokenizer!r}")
        if self.chunk_temperature <= 0:
            raise ValueError(f"chunk_temperature must be > 0, got {self.chunk_temperature}")
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {', '.join(MIXES)}, got {self.mix!r}")

    def check_sampled(self) -> None:
        """Raise ValueError if this loss cannot use a sampled teacher."""
        if self.loss != "ce" and self.base != "fkl":
            raise ValueError(
                f"a sampled cache supports forward KL only (base fkl), not {self.base!r}: the "
                f"draws estimate expectations under the teacher, which other divergences are not"
            )
        if self.temperature != 1.0:
            raise ValueError("a sampled cache holds draws at temperature 1: use temperature 1")


@dataclass
class LossOutput:
    """The loss to backpropagate and detached parts for logging."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def is_count(part: str) -> bool:
    """Is a loss part a count (tokens, easy/hard tokens, chunks)? Counts add up over a
    step's micro-batches; the other parts are means, weighted by each micro-batch's share."""
    return part.endswith("tokens") or part == "chunks"


def _masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over rows with weight 1; exactly 0 (not NaN) when there are none."""
    count = weight.sum()
    return (values * weight).sum() / count.clamp(min=1.0)


def target_split(pair: BucketedPair) -> tuple[BucketedPair, BucketedPair]:
    """(binary target/non-target distributions, non-target distributions renormalised).

    log(1 - p_g) is the log of the summed non-target columns, so it neither cancels near
    p_g -> 1 nor becomes -inf for the student while any non-target mass is representable."""
    def rest(lp, valid):
        return torch.logsumexp(torch.where(valid[:, 1:], lp[:, 1:], float("-inf")), dim=1)

    lp_rest, lq_rest = rest(pair.teacher, pair.valid), rest(pair.student, pair.valid)
    binary = BucketedPair(
        teacher=torch.stack([pair.teacher[:, 0], lp_rest], dim=1),
        student=torch.stack([pair.student[:, 0], lq_rest], dim=1),
        valid=torch.ones(pair.valid.shape[0], 2, dtype=torch.bool, device=pair.valid.device),
    )
    # Rows where the teacher puts all mass on the target have no non-target distribution.
    has_rest = torch.isfinite(lp_rest) & torch.isfinite(lq_rest)
    nontarget = BucketedPair(
        teacher=pair.teacher[:, 1:] - torch.where(has_rest, lp_rest, 0.0)[:, None],
        student=pair.student[:, 1:] - torch.where(has_rest, lq_rest, 0.0)[:, None],
        valid=pair.valid[:, 1:] & has_rest[:, None],
    )
    return binary, nontarget


def topk_row_terms(
    logits: torch.Tensor, teacher: SparseTeacher, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """Per-row terms over the bucketed top-k teacher: "ce", and cfg.base (loss kd) or
    "tkd" and "dkd" (loss atkd)."""
    pair = bucketize(
        logits, teacher.topk_ids, teacher.topk_logprobs, teacher.target_ids,
        teacher.target_logprob, tail=cfg.tail, temperature=cfg.temperature,
        chunk_rows=cfg.chunk_rows,
    )
    # the target column: -log q(target) = logsumexp(z) - z_g, i.e. cross-entropy
    terms = {"ce": -pair.student[:, 0]}
    opts = {"beta": cfg.beta, "skew": cfg.skew}
    if cfg.loss == "kd":
        terms[cfg.base] = divergence(cfg.base, pair.teacher, pair.student, pair.valid, **opts)
    elif cfg.loss == "atkd":
        binary, nontarget = target_split(pair)
        terms["tkd"] = divergence(cfg.base, binary.teacher, binary.student, binary.valid, **opts)
        terms["dkd"] = divergence(
            cfg.base, nontarget.teacher, nontarget.student, nontarget.valid, **opts
        )
    return terms


def sampled_row_terms(
    logits: torch.Tensor, teacher: SparseTeacher, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """Per-row terms over a sampled teacher (losses/sampled.py)."""
    cfg.check_sampled()
    if cfg.loss != "ce" and teacher.entropy is None:
        raise ValueError("a sampled teacher needs the cached entropy")
    want = {"ce": "ce", "kd": "fkl", "atkd": "atkd", "rkl-tokens": "ce"}[cfg.loss]
    return sampled_terms(
        logits, teacher.sample_ids, teacher.sample_counts, teacher.target_ids,
        teacher.target_logprob, teacher.entropy, want, cfg.chunk_rows,
    )


def hard_mask(
    teacher: SparseTeacher, cfg: LossConfig, group_offsets: torch.Tensor | list[int] | None
) -> torch.Tensor:
    """Hard labels: the cache's, or re-split by rho per sequence or over the batch.

    The re-split ranks -log p(target), which orders positions exactly as UNC = 1 - p(target)
    does but has no float32 ties at UNC = 1."""
    if cfg.split == "cache":
        if teacher.hard is None:
            raise ValueError("split='cache' needs the cache's hard labels")
        return teacher.hard.bool()
    score = -teacher.target_logprob.float()
    if cfg.split == "batch":
        return hard_labels(score, cfg.hard_ratio)
    if group_offsets is None:
        raise ValueError("split='sequence' needs group_offsets (row offsets of each sequence)")
    return hard_labels_grouped(score, group_offsets, cfg.hard_ratio)


def row_terms(
    logits: torch.Tensor, teacher: SparseTeacher, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """Per-row loss terms of the configured loss (top-k or sampled teacher)."""
    if teacher.sampled:
        return sampled_row_terms(logits, teacher, cfg)
    return topk_row_terms(logits, teacher, cfg)


@dataclass
class RowGroups:
    """Which rows count (`weight`, 0/1) and, for ATKD, which are easy and hard."""

    weight: torch.Tensor  # [N]
    easy: torch.Tensor | None = None  # [N], weight * easy label
    hard: torch.Tensor | None = None
    # rkl-tokens: each row's (detached) return rho * G_t and reverse-KL term rho * d_t
    returns: torch.Tensor | None = None
    rkl: torch.Tensor | None = None


def row_groups(
    teacher: SparseTeacher, cfg: LossConfig, n: int, work: torch.dtype,
    row_mask: torch.Tensor | None = None, group_offsets: torch.Tensor | list[int] | None = None,
    student_logprob: torch.Tensor | None = None,
) -> RowGroups:
    """The row groups of a loss: they depend on the teacher only, except rkl-tokens' returns,
    which need the student's (detached) log-prob of each target, `student_logprob`."""
    weight = torch.ones(n, dtype=work, device=teacher.target_ids.device)
    if row_mask is not None:
        weight = weight * row_mask.to(work)
    if cfg.loss == "rkl-tokens":
        if student_logprob is None or group_offsets is None:
            raise ValueError("loss rkl-tokens needs the student's target log-probs and the "
                             "replies' group_offsets")
        returns, rkl = rkl_token_weights(student_logprob, teacher.target_logprob,
                                         group_offsets, cfg.discount)
        return RowGroups(weight, returns=returns.to(work), rkl=rkl.to(work))
    if cfg.loss != "atkd":
        return RowGroups(weight)
    is_hard = hard_mask(teacher, cfg, group_offsets)
    return RowGroups(weight, easy=(~is_hard).to(work) * weight, hard=is_hard.to(work) * weight)


def combine(terms: dict[str, torch.Tensor], groups: RowGroups, cfg: LossConfig) -> LossOutput:
    """The loss and its logged parts from per-row terms (group means, as the paper)."""
    weight = groups.weight
    ce = _masked_mean(terms["ce"], weight)
    parts: dict[str, torch.Tensor] = {"ce": ce.detach(), "tokens": weight.sum().detach()}
    if cfg.loss == "ce":
        loss = ce
    elif cfg.loss == "rkl-tokens":  # sum_rows sg(rho G_t) log q(y_t) / N
        loss = -_masked_mean(groups.returns * terms["ce"], weight)
        parts["rkl_tokens"] = _masked_mean(groups.rkl, weight).detach()
    elif cfg.loss == "kd":
        loss = _masked_mean(terms[cfg.base], weight)
        parts[cfg.base] = loss.detach()
    else:
        tkd, dkd, easy, hard = terms["tkd"], terms["dkd"], groups.easy, groups.hard
        loss = cfg.alpha * _masked_mean(dkd, easy) + (1 - cfg.alpha) * _masked_mean(
            tkd + dkd, hard
        )
        parts.update(
            tkd_easy=_masked_mean(tkd, easy).detach(), dkd_easy=_masked_mean(dkd, easy).detach(),
            tkd_hard=_masked_mean(tkd, hard).detach(), dkd_hard=_masked_mean(dkd, hard).detach(),
            easy_tokens=easy.sum().detach(), hard_tokens=hard.sum().detach(),
        )
    if cfg.ce_weight and cfg.loss != "ce":
        loss = loss + cfg.ce_weight * ce
    parts["loss"] = loss.detach()
    return LossOutput(loss=loss, parts=parts)


def term_weights(groups: RowGroups, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Per-row weight of each term such that `combine(terms).loss` = sum over terms and rows
    of weight * term: the loss is linear in the per-row terms, which is what lets the fused
    LM head (losses/fused.py) differentiate it one chunk of rows at a time."""
    def share(mask):
        return mask / mask.sum().clamp(min=1.0)

    if cfg.loss == "ce":
        return {"ce": share(groups.weight)}
    if cfg.loss == "rkl-tokens":
        out = {"ce": -groups.returns * share(groups.weight)}
        if cfg.ce_weight:
            out["ce"] = out["ce"] + cfg.ce_weight * share(groups.weight)
        return out
    if cfg.loss == "kd":
        out = {cfg.base: share(groups.weight)}
    else:
        hard = (1 - cfg.alpha) * share(groups.hard)
        out = {"tkd": hard, "dkd": cfg.alpha * share(groups.easy) + hard}
    if cfg.ce_weight:
        out["ce"] = cfg.ce_weight * share(groups.weight)
    return out


def kd_loss(
    logits: torch.Tensor,
    teacher: SparseTeacher,
    cfg: LossConfig | None = None,
    row_mask: torch.Tensor | None = None,
    group_offsets: torch.Tensor | list[int] | None = None,
) -> LossOutput:
    """The configured loss for N positions: student logits [N, V] (fp32/bf16/fp16) and the
    cached teacher rows. `row_mask` [N] excludes rows (they count nowhere); `group_offsets`
    delimits sequences for split='sequence'."""
    cfg = cfg or LossConfig()
    cfg.check()
    terms = row_terms(logits, teacher, cfg)
    groups = row_groups(teacher, cfg, logits.shape[0], terms["ce"].dtype, row_mask,
                        group_offsets, student_logprob=-terms["ce"].detach())
    return combine(terms, groups, cfg)
