"""The statistics behind every verdict: differences of means, paired differences, power.

A verdict ("MTP better" / "MTP worse") needs the difference to exceed two standard errors; that is
a two-sided test at about the 5 % level. Power is the probability that a rerun with fresh seeds
reaches such a verdict, under the normal approximation: with the true difference d and the
standard error se a set of seeds gives, power = Φ(|d| / se − 2) (the far tail, Φ(−|d| / se − 2), is
negligible). The seeds a side that 80 % power needs follow from se ∝ 1 / √seeds:
(2 + z₀.₈)² · spread² / d², with z₀.₈ = 0.8416 and spread² = s²_setting + s²_baseline (unpaired) or
s²_differences (paired). These are planning figures: with the spread itself estimated from a few
seeds they are rough, and they say so by being rounded up.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

Z_POWER = 0.8416  # Φ⁻¹(0.8)
VERDICT_SE = 2.0  # a verdict needs |difference| > 2 standard errors


@dataclasses.dataclass(frozen=True)
class Difference:
    """Setting minus baseline: the mean difference, its standard error and the spread behind it."""

    difference: float
    standard_error: float | None  # None with a single seed on a side
    spread: float | None  # sqrt(s²_a + s²_b) unpaired, s_differences paired
    seeds: int  # seeds a side (pairs, when paired)
    paired: bool

    @property
    def power(self) -> float | None:
        """Probability that a rerun with as many fresh seeds gives a verdict, at this difference."""
        if not self.standard_error:
            return None
        return normal_cdf(abs(self.difference) / self.standard_error - VERDICT_SE)

    @property
    def seeds_for_power(self) -> int | None:
        """Seeds a side (or pairs) for 80 % power at this difference and spread."""
        if self.spread is None or self.difference == 0:
            return None
        return max(2, math.ceil(((VERDICT_SE + Z_POWER) * self.spread / self.difference) ** 2))

    def as_dict(self) -> dict:
        return {
            "difference": self.difference,
            "standard_error": self.standard_error,
            "spread": self.spread,
            "seeds": self.seeds,
            "paired": self.paired,
            "power": self.power,
            "seeds_for_power": self.seeds_for_power,
        }


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def unpaired(values: list[float], base: list[float]) -> Difference:
    """Difference of means with the standard error sqrt(s²_a/n_a + s²_b/n_b), seeds being
    independent draws on each side."""
    d = statistics.fmean(values) - statistics.fmean(base)
    if len(values) < 2 or len(base) < 2:
        return Difference(d, None, None, min(len(values), len(base)), paired=False)
    va, vb = statistics.variance(values), statistics.variance(base)
    return Difference(
        d, (va / len(values) + vb / len(base)) ** 0.5, (va + vb) ** 0.5, min(len(values), len(base)), paired=False
    )


def paired(values: dict, base: dict) -> Difference:
    """Mean ± standard error of the per-seed differences, over the seeds both sides ran
    (values and base: seed → number)."""
    seeds = sorted(set(values) & set(base))
    diffs = [values[s] - base[s] for s in seeds]
    d = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Difference(d, None, None, len(diffs), paired=True)
    sd = statistics.stdev(diffs)
    return Difference(d, sd / len(diffs) ** 0.5, sd, len(diffs), paired=True)


def verdict(d: float, se: float | None, higher_is_better: bool, subject: str = "MTP") -> str:
    """'SUBJECT better'/'SUBJECT worse' only beyond two standard errors; otherwise 'no difference (< 2 s.e.)'."""
    if se is None:
        return "one seed: no verdict"
    if abs(d) <= VERDICT_SE * se:
        return "no difference (< 2 s.e.)" if d else "equal"
    return f"{subject} {'better' if (d > 0) == higher_is_better else 'worse'}"
