"""The fused teacher extraction against a float64 dense reference."""

import torch

from atkd_cache.teacher.extract import position_stats


def reference(logits, targets, k):
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    top = logp.topk(k, -1)
    tgt = logp.gather(1, targets[:, None]).squeeze(1)
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    return top, tgt, ent, 1 - tgt.exp()


def test_matches_dense_reference_with_targets_inside_and_outside_topk():
    g = torch.Generator().manual_seed(0)
    n, v, k = 50, 300, 8
    logits = torch.randn(n, v, generator=g) * 3
    targets = torch.randint(0, v, (n,), generator=g)
    targets[:10] = logits[:10].argmax(-1)  # some targets inside the top-k
    s = position_stats(logits, targets, k, chunk_rows=7)
    top, tgt, ent, unc = reference(logits, targets, k)
    inside = (s.topk_ids == targets[:, None]).any(1)
    assert inside[:10].all() and not inside.all()
    assert torch.equal(s.topk_ids, top.indices)
    torch.testing.assert_close(s.topk_logprobs.double(), top.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.target_logprob.double(), tgt, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.entropy.double(), ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.uncertainty.double(), unc, atol=1e-6, rtol=0)


def test_bf16_logits_are_upcast_and_k_equals_v_gives_full_distribution():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 64, generator=g) * 4).bfloat16()
    targets = torch.randint(0, 64, (5,), generator=g)
    s = position_stats(logits, targets, 64)
    full = torch.log_softmax(logits.double(), -1)
    rebuilt = torch.empty_like(full).scatter_(1, s.topk_ids, s.topk_logprobs.double())
    torch.testing.assert_close(rebuilt, full, atol=1e-5, rtol=0)
    assert torch.allclose(rebuilt.exp().sum(-1), torch.ones(5, dtype=torch.float64))


def test_extreme_logits_stay_finite():
    logits = torch.full((3, 100), -1e4)
    logits[:, 0] = 1e4
    logits[1, 5:] = float("-inf")  # masked tokens
    logits[2] = 0.0
    targets = torch.tensor([0, 3, 7])
    s = position_stats(logits, targets, 4)
    for t in (s.topk_logprobs, s.target_logprob, s.entropy, s.uncertainty):
        assert torch.isfinite(t).all()
    assert s.uncertainty[0] == 0.0 and s.entropy[0] == 0.0
    assert abs(s.uncertainty[1].item() - 1.0) < 1e-6
    assert abs(s.entropy[2].item() - torch.log(torch.tensor(100.0)).item()) < 1e-5
