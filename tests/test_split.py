import numpy as np
import pytest
import torch

from atkd_cache.split import hard_labels, hard_labels_grouped, hard_labels_np


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 33])
def test_ratio_half_reproduces_torch_median_rule(n):
    g = torch.Generator().manual_seed(n)
    unc = torch.rand(n, generator=g, dtype=torch.float64)
    official = unc >= torch.median(unc)  # the official ATKD code's rule
    assert torch.equal(hard_labels(unc, 0.5), official)
    assert np.array_equal(hard_labels_np(unc.numpy(), 0.5), official.numpy())


def test_ratio_extremes_and_general_rule():
    unc = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    assert hard_labels(unc, 1.0).all()
    assert not hard_labels(unc, 0.0).any()
    # rho = 0.2: threshold = sorted[floor(4 * 0.8)] = sorted[3] = 0.7
    assert hard_labels(unc, 0.2).tolist() == [False, False, True, False, True]
    assert hard_labels(torch.zeros(0), 0.5).shape == (0,)


def test_ties_go_to_hard():
    unc = torch.tensor([0.2, 0.2, 0.2, 0.2])
    assert hard_labels(unc, 0.25).all()


def test_grouped_applies_rule_per_group():
    unc = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8])
    out = hard_labels_grouped(unc, [0, 3, 5], 0.5)
    assert out.tolist() == [False, True, True, True, True]  # lower median of 2
