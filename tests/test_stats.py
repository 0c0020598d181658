"""The study's paired statistics (atkd_cache/recipes/stats.py) against what they must equal."""

from __future__ import annotations

import math

import numpy as np
import pytest

from atkd_cache.recipes.stats import POWER_Z, paired_bootstrap, verdict


def test_bootstrap_se_matches_the_formula_for_independent_noise():
    """Independent N(0.3, 1) differences over 5 seeds x 400 prompts: the two-way bootstrap's
    standard error is the conservative sqrt(3) sigma / sqrt(S P) (the residual counted in
    the seed share, the prompt share and their product; the true one is sigma / sqrt(S P)),
    the interval holds the true mean, the MDE is 2.8 se."""
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, size=(5, 400))
    p = paired_bootstrap(d, draws=3000, seed=2)
    true = 1.0 / math.sqrt(d.size)
    assert p.se == pytest.approx(math.sqrt(3) * true, rel=0.15) and p.se > true
    assert p.low < 0.3 < p.high and p.mean == pytest.approx(d.mean())
    assert p.mde == pytest.approx(POWER_Z * p.se) and POWER_Z == pytest.approx(2.8016, abs=1e-3)
    assert (p.seeds, p.prompts) == (5, 400)


def test_seed_noise_widens_the_interval():
    """A shift shared by all prompts of a seed is noise a prompt-only bootstrap misses: the
    two-way interval must grow with it."""
    rng = np.random.default_rng(3)
    base = rng.normal(0.0, 0.2, size=(5, 300))
    shifted = base + rng.normal(0.0, 0.5, size=(5, 1))
    assert paired_bootstrap(shifted).se > 3 * paired_bootstrap(base).se


def test_nan_prompts_are_left_out_and_one_seed_still_has_prompt_noise():
    d = np.array([[1.0, np.nan, 3.0, 2.0]])
    p = paired_bootstrap(d, draws=500)
    assert p.mean == pytest.approx(2.0) and p.high > p.low  # prompts still vary
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros(4))


def test_verdict_words_follow_the_interval_and_the_smallest_effect():
    from atkd_cache.recipes.stats import Paired

    def at(low, high):
        return Paired(mean=(low + high) / 2, low=low, high=high, se=(high - low) / 3.92,
                      mde=POWER_Z * (high - low) / 3.92, seeds=5, prompts=300)

    assert verdict(at(0.002, 0.01), 0.01, "A better", "A worse").startswith("A better")
    assert verdict(at(-0.02, -0.001), 0.01, "A better", "A worse").startswith("A worse")
    assert verdict(at(-0.004, 0.006), 0.01, "b", "w").startswith("no difference as large")
    assert verdict(at(-0.02, 0.03), 0.01, "b", "w").startswith("no detectable difference")


def test_seed_interval_is_the_t_interval():
    """Per-seed differences: the mean, the 95 % Student-t interval and the t-based MDE,
    against the formula; one seed gives no interval."""
    from atkd_cache.recipes.stats import seed_interval

    d = np.array([0.10, -0.02, 0.05, 0.07, 0.01])
    p = seed_interval(d)
    se = d.std(ddof=1) / math.sqrt(5)
    assert p.mean == pytest.approx(d.mean()) and p.se == pytest.approx(se)
    assert p.low == pytest.approx(d.mean() - 2.776 * se)
    assert p.high == pytest.approx(d.mean() + 2.776 * se)
    assert p.mde == pytest.approx((2.776 + 0.941) * se) and p.seeds == 5
    one = seed_interval([0.3])
    assert one.low == one.high == one.mean == 0.3 and math.isnan(one.se)
