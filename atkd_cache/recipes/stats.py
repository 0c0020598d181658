"""Paired comparisons for the study: a two-way bootstrap over seeds and prompts, and the
minimum detectable effect that goes with it.

A difference table D[s, p] holds arm − baseline for seed s (the same data order for both
arms) and test prompt p. Its mean is the effect; resampling seeds and prompts independently
(with replacement) covers both sources of noise a reader cares about — another data order
and another test set — which a t interval over seed means (prompts fixed) does not. It is
conservative for the residual: with independent noise it counts the residual variance about
three times (sigma_s^2/S + sigma_p^2/P + 3 sigma_e^2/(S P) for the variance of the mean,
where the truth has 1 sigma_e^2; Owen 2007, "The pigeonhole bootstrap"). It is NOT
conservative for the seed part when there are few seeds: resampling S seeds gives
(S - 1)/S of sigma_s^2/S and percentile quantiles where a t with S - 1 degrees of freedom
applies. When most of the variance is between seeds (3 seeds, say), `seed_interval` over the
seed means is the honest interval; the study's report prints both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# (z_0.975 + z_0.80): an effect this many standard errors from 0 is found with 80 % power by
# a two-sided test at alpha = 0.05.
POWER_Z = 1.959964 + 0.841621


@dataclass
class Paired:
    """A paired effect: mean, 95 % percentile interval, bootstrap standard error, and the
    minimum detectable effect at 80 % power (POWER_Z x se)."""

    mean: float
    low: float
    high: float
    se: float
    mde: float
    seeds: int
    prompts: int

    def to_json(self) -> dict:
        """As a plain dict (results files)."""
        return asdict(self)


def paired_bootstrap(diffs, draws: int = 2000, seed: int = 0) -> Paired:
    """Two-way bootstrap of the mean of `diffs` [seeds, prompts] (NaN = a prompt with no
    value for that seed, left out of every mean it falls in)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"diffs must be [seeds, prompts], got shape {d.shape}")
    rng = np.random.default_rng(seed)
    n_seeds, n_prompts = d.shape
    means = np.empty(draws)
    for b in range(draws):
        rows = rng.integers(n_seeds, size=n_seeds)
        cols = rng.integers(n_prompts, size=n_prompts)
        means[b] = np.nanmean(d[np.ix_(rows, cols)])
    se = float(np.nanstd(means, ddof=1))  # (a draw of only NaN prompts is left out)
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return Paired(mean=float(np.nanmean(d)), low=float(low), high=float(high), se=se,
                  mde=POWER_Z * se, seeds=n_seeds, prompts=n_prompts)


# Student's t quantiles by degrees of freedom: 0.975 (the 95 % interval) and 0.80 (power)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}
T_80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889,
        9: 0.883}


def seed_interval(diffs) -> Paired:
    """A per-seed paired difference (one number per seed, e.g. a cache metric): mean, 95 %
    Student-t interval, and the t-based minimum detectable effect (t_0.975 + t_0.80) x se.
    A bootstrap over 5 seeds would understate the spread. One seed: low = high = mean, se NaN."""
    d = np.asarray(diffs, dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError("no differences")
    mean = float(d.mean())
    if d.size < 2:
        return Paired(mean, mean, mean, float("nan"), float("nan"), 1, 1)
    df = d.size - 1
    se = float(d.std(ddof=1) / np.sqrt(d.size))
    t975, t80 = T_975.get(df, 1.96), T_80.get(df, 0.8416)
    return Paired(mean, mean - t975 * se, mean + t975 * se, se, (t975 + t80) * se, d.size, 1)


def verdict(effect: Paired, smallest: float, better: str, worse: str) -> str:
    """The sentence the effect supports, given the smallest effect worth detecting: a
    direction only when the interval excludes 0; "no difference as large as `smallest`" only
    when the interval lies within ±smallest; otherwise not detectable at this size."""
    span = f"{effect.mean:+.4f} [{effect.low:+.4f}, {effect.high:+.4f}]"
    power = f"the run could detect effects of {effect.mde:.4f} or more (80 % power)"
    if effect.low > 0:
        return f"{better} ({span}; {power})"
    if effect.high < 0:
        return f"{worse} ({span}; {power})"
    if -smallest < effect.low and effect.high < smallest:
        return (f"no difference as large as {smallest:g} ({span}; {power})")
    return (f"no detectable difference, and an effect of {smallest:g} cannot be ruled out "
            f"({span}; {power})")
