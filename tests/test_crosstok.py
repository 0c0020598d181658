"""ALM's chunk likelihood loss (losses/crosstok.py) against a plain float64 reference written
from the formula (value and gradient), chunks built by the byte alignment of two real
tokenizations, and its reduction with one tokenizer to ATKD's TKD plus the teacher's binary
entropy (the single-tokenizer loss already proven in tests/test_losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from atkd_cache.losses.crosstok import alm_loss, chunk_sums
from atkd_cache.losses.kd import LossConfig, SparseTeacher, row_terms


def reference(student_lp_tokens, teacher_lp_tokens, chunk_of_s, chunk_of_t, n, tau):
    """The formula, one chunk at a time, in plain Python floats (no vectorised helper)."""
    total = 0.0
    for c in range(n):
        ls = sum(float(v) for v, k in zip(student_lp_tokens, chunk_of_s, strict=True) if k == c)
        lt = sum(float(v) for v, k in zip(teacher_lp_tokens, chunk_of_t, strict=True) if k == c)
        s_s, s_t = math.exp(ls / tau), math.exp(lt / tau)
        total += -(s_t * math.log(s_s) + (1 - s_t) * math.log(1 - s_s))
    return total / n


@pytest.mark.parametrize("tau", [1.0, 3.0, 100.0])
def test_alm_equals_the_formula_value_and_gradient(tau):
    g = torch.Generator().manual_seed(0)
    vocab, n_s, n_t = 13, 9, 7
    logits = torch.randn(n_s, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(vocab, (n_s,), generator=g)
    teacher_lp = -torch.rand(n_t, generator=g, dtype=torch.float64) * 3
    # 4 chunks: student tokens 2+3+1+3, teacher tokens 1+2+2+2 (as byte alignment gives)
    chunk_s = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    chunk_t = torch.tensor([0, 1, 1, 2, 2, 3, 3])
    lq = torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0]
    got = alm_loss(chunk_sums(lq, chunk_s, 4), chunk_sums(teacher_lp, chunk_t, 4), tau)
    want = reference(lq.tolist(), teacher_lp.tolist(), chunk_s.tolist(), chunk_t.tolist(), 4,
                     tau)
    assert float(got.detach()) == pytest.approx(want, rel=1e-12)
    (grad,) = torch.autograd.grad(got, logits)
    # finite differences of the plain reference, on a few coordinates
    for row, col in ((0, 3), (4, ids[4].item()), (8, 0)):
        step = 1e-6
        plus, minus = logits.detach().clone(), logits.detach().clone()
        plus[row, col] += step
        minus[row, col] -= step
        def f(z):
            lp = torch.log_softmax(z, -1).gather(1, ids[:, None])[:, 0]
            return reference(lp.tolist(), teacher_lp.tolist(), chunk_s.tolist(),
                             chunk_t.tolist(), 4, tau)
        numeric = (f(plus) - f(minus)) / (2 * step)
        assert float(grad[row, col]) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_one_tokenizer_reduces_to_tkd_plus_the_teachers_binary_entropy():
    """Chunks = tokens, tau = 1: alm = mean over tokens of TKD + H([p(g), 1 - p(g)])."""
    g = torch.Generator().manual_seed(1)
    n, vocab, k = 11, 17, 5
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    t_logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    t_lp = torch.log_softmax(t_logits, -1)
    target = torch.randint(vocab, (n,), generator=g)
    top = t_lp.topk(k, dim=-1)
    teacher = SparseTeacher(topk_ids=top.indices, topk_logprobs=top.values, target_ids=target,
                            target_logprob=t_lp.gather(1, target[:, None])[:, 0],
                            hard=torch.ones(n, dtype=torch.bool))
    tkd = row_terms(logits, teacher, LossConfig(loss="atkd"))["tkd"]
    p = teacher.target_logprob.exp()
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    lq = torch.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]
    every = torch.arange(n)
    got = alm_loss(chunk_sums(lq, every, n), chunk_sums(teacher.target_logprob, every, n))
    torch.testing.assert_close(got, (tkd + entropy).mean(), rtol=1e-12, atol=1e-12)


def test_alm_with_chunks_from_two_real_tokenizations(tmp_path):
    """Chunks cut by the byte alignment of two tokenizers of different vocabularies: every
    chunk's teacher and student tokens cover the same bytes, and the chunk sums of the
    per-token values equal the per-chunk sums of the plain reference."""
    from transformers import AutoTokenizer

    from atkd_cache import tiny
    from atkd_cache.cache.text import token_bytes
    from atkd_cache.train.align import byte_ends, chunks

    toks = []
    for name, size, seed in (("t", 300, 0), ("s", 420, 5)):
        tiny.build_tokenizer(str(tmp_path / name), vocab_size=size, seed=seed)
        toks.append(AutoTokenizer.from_pretrained(str(tmp_path / name)))
    text = "The quick cat sat; naïve café 東京 🙂 12345 done."
    ids = [t(text, add_special_tokens=False)["input_ids"] for t in toks]
    tables = [token_bytes(t) for t in toks]
    cut = chunks(byte_ends(ids[0], tables[0]), byte_ends(ids[1], tables[1]))
    chunk_t = torch.zeros(len(ids[0]), dtype=torch.long)
    chunk_s = torch.zeros(len(ids[1]), dtype=torch.long)
    for c, (a_lo, a_hi, b_lo, b_hi) in enumerate(cut):
        chunk_t[a_lo:a_hi], chunk_s[b_lo:b_hi] = c, c
    g = torch.Generator().manual_seed(2)
    lt = -torch.rand(len(ids[0]), generator=g, dtype=torch.float64) * 2
    ls = -torch.rand(len(ids[1]), generator=g, dtype=torch.float64) * 2
    got = alm_loss(chunk_sums(ls, chunk_s, len(cut)), chunk_sums(lt, chunk_t, len(cut)), 2.0)
    want = reference(ls.tolist(), lt.tolist(), chunk_s.tolist(), chunk_t.tolist(), len(cut),
                     2.0)
    assert float(got.detach()) == pytest.approx(want, rel=1e-12)
    # the tokenizations do differ: some chunk holds several tokens of one side
    assert any(a_hi - a_lo > 1 or b_hi - b_lo > 1 for a_lo, a_hi, b_lo, b_hi in cut)


# ------------------------------------------------------------------ ULD and GOLD


def uld_reference(q: list[float], support: list[tuple[float, bool]]) -> float:
    """Boizard et al.'s sorted L1, literally: the teacher's vector (its valid support masses,
    the tail 1 - their sum, zeros to the student's size) and the student's whole vector, each
    sorted in decreasing order, then sum |difference|."""
    p = [m for m, ok in support if ok]
    p = p + [max(0.0, 1.0 - sum(p))]
    p = sorted(p + [0.0] * (len(q) - len(p)), reverse=True)
    return sum(abs(a - b) for a, b in zip(p, sorted(q, reverse=True), strict=True))


def gold_reference(q: list[float], support: list[tuple[float, bool, int]]) -> float:
    """GOLD per chunk from its definition: matched = valid support entries with a student id
    (first of each student id); forward KL over the matched entries plus one bucket for the
    rest on each side; plus the sorted L1 between the unmatched teacher masses and the
    student's largest masses outside the matched ids, as many as there are unmatched."""
    seen, matched, unmatched = set(), [], []
    for m, ok, sid in support:
        if not ok:
            continue
        if sid >= 0 and sid not in seen:
            seen.add(sid)
            matched.append((m, sid))
        elif sid < 0:
            unmatched.append(m)
    kl = sum(m * (math.log(m) - math.log(q[sid])) for m, sid in matched if m > 0)
    p_rest = 1.0 - sum(m for m, _ in matched)
    q_rest = 1.0 - sum(q[sid] for _, sid in matched)
    if p_rest > 0:
        kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    others = sorted((v for i, v in enumerate(q) if i not in seen), reverse=True)
    unmatched = sorted(unmatched, reverse=True)
    return kl + sum(abs(a - b) for a, b in zip(unmatched, others[:len(unmatched)], strict=True))


def _chunk_case(seed: int, vocab: int = 23, k: int = 6, n: int = 7):
    """Student logits at n chunk starts, a teacher support (target + top-k) whose ids some
    student tokens share (a random map, some -1, and two teacher ids onto one student id)."""
    from atkd_cache.losses.bucket import support_columns

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    t_lp = torch.log_softmax(torch.randn(n, 40, generator=g, dtype=torch.float64) * 2, -1)
    top = t_lp.topk(k, dim=-1)
    target = torch.where(torch.rand(n, generator=g) < 0.5, top.indices[:, 0],
                         torch.randint(40, (n,), generator=g))
    ids, valid = support_columns(top.indices, target)
    lp = torch.cat([t_lp.gather(1, target[:, None]), top.values], 1)
    mapping = torch.randint(vocab, (40,), generator=g)
    mapping[torch.rand(40, generator=g) < 0.3] = -1
    mapping[top.indices[0, 0]] = mapping[top.indices[0, 1]] = 4  # two teacher ids, one token
    mapping[top.indices[1]] = -1  # a chunk start where no top-k token exists in the student
    sids = mapping[ids]
    assert ((sids < 0) & valid).any() and ((sids >= 0) & valid).any()
    return logits, lp, valid, sids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uld_and_gold_equal_their_definitions_value_and_gradient(seed):
    from atkd_cache.losses.crosstok import gold_terms, uld_terms

    logits, lp, valid, sids = _chunk_case(seed)
    for name, fn, ref in (
        ("uld", lambda lq: uld_terms(lq, lp, valid), lambda q, r: uld_reference(
            q, list(zip(lp[r].exp().tolist(), valid[r].tolist(), strict=True)))),
        ("gold", lambda lq: gold_terms(lq, lp, valid, sids), lambda q, r: gold_reference(
            q, list(zip(lp[r].exp().tolist(), valid[r].tolist(), sids[r].tolist(),
                        strict=True)))),
    ):
        got = fn(torch.log_softmax(logits, -1))
        for r in range(logits.shape[0]):
            q = torch.softmax(logits[r].detach(), -1).tolist()
            assert float(got[r].detach()) == pytest.approx(ref(q, r), rel=1e-10, abs=1e-12), \
                (name, r)
        (grad,) = torch.autograd.grad(got.sum(), logits)
        for row, col in ((0, 0), (3, 4), (6, 11)):
            step = 1e-6
            vals = []
            for sign in (1, -1):
                z = logits.detach().clone()
                z[row, col] += sign * step
                vals.append(ref(torch.softmax(z[row], -1).tolist(), row))
            numeric = (vals[0] - vals[1]) / (2 * step)
            assert float(grad[row, col]) == pytest.approx(numeric, rel=1e-5, abs=1e-8), name


def test_gold_with_every_id_matched_is_the_single_tokenizer_kd():
    """One tokenizer: every support id is its own student id, so GOLD is the KD base over
    the bucketed top-k (losses/kd.py row_terms), for every base divergence."""
    from atkd_cache.losses.bucket import support_columns
    from atkd_cache.losses.crosstok import gold_terms

    g = torch.Generator().manual_seed(3)
    n, vocab, k = 9, 31, 5
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    t_lp = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2, -1)
    top = t_lp.topk(k, dim=-1)
    target = torch.where(torch.arange(n) % 2 == 0, top.indices[:, 1],
                         torch.randint(vocab, (n,), generator=g))
    teacher = SparseTeacher(topk_ids=top.indices, topk_logprobs=top.values, target_ids=target,
                            target_logprob=t_lp.gather(1, target[:, None])[:, 0],
                            hard=torch.ones(n, dtype=torch.bool))
    ids, valid = support_columns(top.indices, target)
    lp = torch.cat([teacher.target_logprob[:, None], top.values], 1)
    for base in ("fkl", "rkl", "jsd", "tvd"):
        want = row_terms(logits, teacher, LossConfig(loss="kd", base=base))[base]
        got = gold_terms(torch.log_softmax(logits, -1), lp, valid, ids, base, beta=0.5)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,ce_weight,softcap", [
    ("alm", 0.0, None), ("alm", 0.5, 3.0), ("uld", 0.0, None), ("gold", 0.3, 3.0),
    ("ce", 0.0, None)])
def test_the_fused_head_equals_the_loss_over_full_rows(mode, ce_weight, softcap):
    """fused_crosstok_loss (no [N, V] logits, chunks of 3 rows so that chunks and row
    blocks cross) gives crosstok_loss's value, parts and gradients for hidden, weight and
    bias, in float64."""
    from atkd_cache.losses.crosstok import ChunkTeacher, crosstok_loss
    from atkd_cache.losses.fused import fused_crosstok_loss, head_logits
    from atkd_cache.losses.kd import LossConfig

    g = torch.Generator().manual_seed(7)
    n, hdim, vocab, n_chunks = 11, 5, 23, 5
    _, lp, valid, sids = _chunk_case(3, vocab=vocab, n=n_chunks)
    chunk_of_row = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 4])
    first_row = torch.tensor([0, 2, 5, 6, 10])
    teacher = ChunkTeacher(
        target_ids=torch.randint(vocab, (n,), generator=g), chunk_of_row=chunk_of_row,
        teacher_ll=-torch.rand(n_chunks, generator=g, dtype=torch.float64) * 3,
        first_row=first_row, support_logprobs=lp, support_valid=valid,
        support_student_ids=sids)
    cfg = LossConfig(cross_tokenizer=mode, ce_weight=ce_weight, chunk_temperature=0.7)

    def inputs():
        g2 = torch.Generator().manual_seed(1)
        return [torch.randn(*shape, generator=g2, dtype=torch.float64, requires_grad=True)
                for shape in ((n, hdim), (vocab, hdim), (vocab,))]

    h, w, b = inputs()
    want = crosstok_loss(head_logits(h, w, b, softcap), teacher, cfg)
    want_grads = torch.autograd.grad(want.loss, [h, w, b])
    h2, w2, b2 = inputs()
    got = fused_crosstok_loss(h2, w2, teacher, cfg, bias=b2, softcap=softcap, chunk_rows=3)
    got_grads = torch.autograd.grad(got.loss, [h2, w2, b2])
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
    assert set(got.parts) == set(want.parts)
    for key in want.parts:
        torch.testing.assert_close(got.parts[key].double(), want.parts[key].double(),
                                   rtol=1e-12, atol=1e-12)
    for a, e in zip(got_grads, want_grads, strict=True):
        assert float(e.abs().max()) > 1e-4  # every input moves the loss
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
