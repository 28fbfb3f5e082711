"""What one decoding call produced (tokens, passes, timings) and the acceptance statistics of
its verify passes. decoding.Generator returns these; benchmarks build them for other engines."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Result:
    """What one decoding call produced, and how long it took."""

    tokens: list[int]  # the new tokens
    forward_passes: int  # prefill included
    accepted: list[int]  # per verify pass, how many drafts were accepted (empty for plain decoding)
    logprobs: list[float] | None = None  # head 1's log-probability of each new token (plain decoding)
    overlaps: list[list[float]] | None = None  # per verify pass and draft position, Σ_x min(p, q) (sampling)
    compile_seconds: float = 0.0  # compiling its program, or loading it from the compilation cache (0: done before)
    decode_seconds: float = 0.0  # running the program and reading its output

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per verify pass (1.0 for plain decoding)."""
        return 1.0 + float(np.mean(self.accepted)) if self.accepted else 1.0

    def acceptance(self, n: int) -> list[float | None]:
        """For each draft k = 2 … n, the fraction of verify passes that accepted it, among those
        that accepted drafts 2 … k-1 (None if no pass got that far)."""
        a = np.asarray(self.accepted)
        return [float(np.mean(a[a >= k - 2] >= k - 1)) if np.any(a >= k - 2) else None for k in range(2, n + 1)]

    def alpha(self) -> list[float | None]:
        """Sampling: for each draft position, the mean of Σ_x min(p, q) (its expected acceptance,
        Leviathan et al.'s α) over the passes that reached it (None if none did)."""
        a, overlaps = np.asarray(self.accepted), np.asarray(self.overlaps)
        return [float(np.mean(overlaps[a >= j, j])) if np.any(a >= j) else None for j in range(overlaps.shape[1])]

    def predicted_mean_accepted(self) -> float:
        """Tokens per pass that α predicts: 1 + α_1 + α_1 α_2 + … (positions independent)."""
        return float(1 + np.sum(np.cumprod([x or 0.0 for x in self.alpha()])))
