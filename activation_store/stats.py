"""Streaming per-dimension moments with a numerically stable merge (Chan et al., 1979)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RunningMoments:
    """Count, per-dimension mean and sum of squared deviations (M2), and the sum of squared norms."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    sum_sq_norm: float = 0.0

    @classmethod
    def empty(cls, dim: int) -> "RunningMoments":
        return cls(0, np.zeros(dim, np.float64), np.zeros(dim, np.float64), 0.0)

    @classmethod
    def of(cls, rows: np.ndarray) -> "RunningMoments":
        """Moments of one block of rows, computed in float64 around the block's own mean."""
        x = np.asarray(rows, dtype=np.float64)
        if x.shape[0] == 0:
            return cls.empty(x.shape[1])
        mean = x.mean(axis=0)
        centered = x - mean
        return cls(x.shape[0], mean, np.einsum("ij,ij->j", centered, centered), float(np.einsum("ij,ij->", x, x)))

    def merge(self, other: "RunningMoments") -> "RunningMoments":
        """Combine two disjoint sets of rows (Chan's parallel update)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / total)
        return RunningMoments(total, mean, m2, self.sum_sq_norm + other.sum_sq_norm)

    @property
    def variance(self) -> np.ndarray:
        """Population variance per dimension (ddof=0)."""
        return self.m2 / max(self.count, 1)

    @property
    def mean_squared_norm(self) -> float:
        """E[||x||^2] over rows."""
        return self.sum_sq_norm / max(self.count, 1)
