"""The fused LM head + KD loss equals the unfused path (LM head -> [N, V] logits -> kd_loss):
value, logged parts, and gradients for the hidden states, the head's weight and bias, for every
loss configuration, at chunk sizes that do and do not divide N; in float32 to 1e-5, in
bfloat16 autocast within a stated tolerance."""

from __future__ import annotations

import pytest
import torch

from atkd_cache.losses import LossConfig, SparseTeacher, kd_loss
from atkd_cache.losses.fused import fused_kd_loss, head_logits

N, H, V, K = 23, 16, 97, 8

CONFIGS = (
    [LossConfig(loss="ce")]
    + [LossConfig(loss="kd", base=b, tail=t) for b in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")
       for t in ("bucket", "renorm")]
    + [LossConfig(loss="atkd", base=b) for b in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")]
    + [LossConfig(loss="atkd", tail="renorm"), LossConfig(loss="atkd", alpha=0.5, ce_weight=0.3),
       LossConfig(loss="kd", ce_weight=0.5, temperature=2.0),
       LossConfig(loss="atkd", split="sequence", hard_ratio=0.3),
       LossConfig(loss="atkd", split="batch", hard_ratio=0.7)]
)


def case(seed=0, dtype=torch.float32, sampled=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    logp = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 3, -1)
    targets = torch.randint(0, V, (N,), generator=g)
    target_logprob = logp.gather(1, targets[:, None])[:, 0].float()
    common = dict(target_ids=targets, target_logprob=target_logprob,
                  hard=torch.rand(N, generator=g) < 0.5, uncertainty=-torch.expm1(target_logprob))
    if not sampled:
        top = logp.topk(K, -1)
        return hidden, weight, bias, SparseTeacher(
            topk_ids=top.indices, topk_logprobs=top.values.float(), **common)
    draws = torch.multinomial(logp.exp(), 12, replacement=True, generator=g)
    ids = torch.zeros(N, 12, dtype=torch.long)
    counts = torch.zeros(N, 12, dtype=torch.int16)
    for i in range(N):
        u, c = draws[i].unique(return_counts=True)
        ids[i, : len(u)], counts[i, : len(u)] = u, c.to(torch.int16)
    entropy = -(logp.exp() * logp).sum(1).float()
    return hidden, weight, bias, SparseTeacher(topk_ids=None, topk_logprobs=None,
                                               entropy=entropy, sample_ids=ids,
                                               sample_counts=counts, **common)


def both(hidden, weight, bias, teacher, cfg, chunk_rows, **kw):
    """(unfused output, its grads), (fused output, its grads) for hidden, weight, bias."""
    results = []
    for fused in (False, True):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        if fused:
            out = fused_kd_loss(h, w, teacher, cfg, bias=b, chunk_rows=chunk_rows, **kw)
        else:
            logits = head_logits(h, w, b, kw.get("softcap"))
            out = kd_loss(logits, teacher, cfg, row_mask=kw.get("row_mask"),
                          group_offsets=kw.get("group_offsets"))
        out.loss.backward()
        results.append((out, (h.grad, w.grad, b.grad)))
    return results


def assert_close(a, b, tol, what):
    scale = max(float(b.abs().max()), 1e-6)
    err = float((a.double() - b.double()).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss}-{c.base}-{c.tail}-"
                         f"{c.split}-a{c.alpha}-ce{c.ce_weight}-T{c.temperature}")
@pytest.mark.parametrize("chunk_rows", [1, 5, 23, 64])  # 5 does not divide 23
def test_fused_equals_unfused_fp32(cfg, chunk_rows):
    hidden, weight, bias, teacher = case()
    offsets = torch.tensor([0, 7, 15, 23])
    (ref, ref_g), (got, got_g) = both(hidden, weight, bias, teacher, cfg, chunk_rows,
                                      group_offsets=offsets)
    assert_close(got.loss.detach(), ref.loss.detach(), 1e-5, "loss")
    assert ref.parts.keys() == got.parts.keys()
    for key in ref.parts:
        assert_close(got.parts[key], ref.parts[key], 1e-5, key)
    for name, a, b in zip(("hidden", "weight", "bias"), got_g, ref_g, strict=True):
        assert_close(a, b, 1e-5, name)


@pytest.mark.parametrize("loss", ["ce", "kd", "atkd"])
def test_fused_sampled_teacher_row_mask_and_softcap(loss):
    hidden, weight, bias, teacher = case(seed=1, sampled=True)
    cfg = LossConfig(loss=loss, base="fkl")
    mask = torch.arange(N) % 4 != 0
    (ref, ref_g), (got, got_g) = both(hidden, weight, bias, teacher, cfg, 6, row_mask=mask,
                                      softcap=7.5)
    assert_close(got.loss.detach(), ref.loss.detach(), 1e-5, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), got_g, ref_g, strict=True):
        assert_close(a, b, 1e-5, name)


def test_tied_weight_gets_both_gradients():
    """A tied LM head is the embedding matrix: its gradient is the sum of both uses."""
    hidden, weight, _, teacher = case(seed=2)
    ids = torch.randint(0, V, (N,))
    grads = []
    for fused in (False, True):
        w = weight.clone().requires_grad_()
        h = torch.nn.functional.embedding(ids, w) + hidden  # the embedding use
        cfg = LossConfig(loss="atkd")
        out = (fused_kd_loss(h, w, teacher, cfg, chunk_rows=4) if fused
               else kd_loss(h @ w.T, teacher, cfg))
        out.loss.backward()
        grads.append(w.grad)
    assert_close(grads[1], grads[0], 1e-5, "tied weight")


def test_bf16_autocast_agrees_with_fp32():
    """Under bf16 autocast the head's matmul runs in bf16 in both paths; the loss terms are
    float32. Tolerance: 2 % of the largest gradient entry, 1 % of the loss."""
    hidden, weight, bias, teacher = case(seed=3)
    cfg = LossConfig(loss="atkd")
    (ref, ref_g), _ = both(hidden, weight, bias, teacher, cfg, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        out = fused_kd_loss(h, w, teacher, cfg, bias=b, chunk_rows=5)
    out.loss.backward()
    assert_close(out.loss.detach(), ref.loss.detach(), 1e-2, "loss")
    for name, a, b_ in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), ref_g,
                           strict=True):
        assert a.dtype == torch.float32
        assert_close(a, b_, 2e-2, name)


@pytest.mark.parametrize("loss", ["atkd", "kd"])
def test_train_student_fused_and_unfused_give_the_same_weights(assets, tmp_path, loss):
    """Three optimizer steps of train-student (fp32, 2 micro-batches per step, GPT-2 with a
    tied head) with the fused head and with --no-fused-head end at the same weights."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from atkd_cache.cli.main import main
    from atkd_cache.train.student import init_student
    from conftest import dump

    dump(assets, tmp_path / "cache", shape="chat", shard_positions=200)
    student = str(tmp_path / "student")
    init_student(assets["gpt2"], "1", student)
    weights = []
    for extra in ((), ("--no-fused-head",)):
        out = tmp_path / f"run{len(weights)}"
        r = CliRunner().invoke(main, [
            "train-student", "--cache", str(tmp_path / "cache"), "--student", student,
            "-o", str(out), "--loss", loss, "--max-steps", "3", "--grad-accum", "2",
            "--batch-tokens", "300", "--lr", "1e-3", "--num-workers", "0", "--no-progress",
            "--no-tensorboard", *extra])
        assert r.exit_code == 0, r.output
        weights.append(load_file(out / "model" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:  # absolute: Adam normalises updates, so tiny tensors move as much
        assert float((weights[0][k] - weights[1][k]).abs().max()) <= 1e-5, k
    first = load_file(f"{student}/model.safetensors")
    moved = max(float((weights[0][k] - first[k]).abs().max()) for k in first)
    assert moved > 1e-4  # the runs trained: equal weights are not equal starting points


def test_second_backward_is_refused():
    """dW is scaled in place in backward (no copy of the head's size): a second backward
    through the same forward would scale it twice, so it is refused."""
    hidden, weight, _, teacher = case(seed=4)
    h = hidden.clone().requires_grad_()
    out = fused_kd_loss(h, weight.clone().requires_grad_(), teacher, LossConfig())
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        out.loss.backward()
