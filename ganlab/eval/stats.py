"""FID and KID from features in torch (float64, on the features' device): the statistics that
evaluation at GPU speed needs without a round trip through numpy. Equal to torch-fidelity's
(`fid_statistics_to_metric`, `kid_features_to_metric`) within 1e-4 relative (tests/test_evaluate.py),
with the same KID subsets for the same seed.

`FeatureStats` accumulates a set's mean and covariance batch by batch (as StyleGAN2-ADA's
metrics/metric_utils.FeatureStats does), so features need not be kept.
"""
from __future__ import annotations

import numpy as np
import torch


class FeatureStats:
    """Running sums of features and their outer products, in float64."""

    def __init__(self, dim: int, device="cpu"):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> "FeatureStats":
        f = features.to(self.sum.device, torch.float64)
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        return self

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and the unbiased covariance (numpy.cov's, which torch-fidelity uses)."""
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2). S1 S2 has the eigenvalues of the
    symmetric S1^1/2 S2 S1^1/2, so the trace of the root is the sum of the square roots of those: two
    symmetric eigendecompositions (eigh) instead of one general one (torch-fidelity's eigvals), 2.5x
    faster at 2048 features on a CPU and fast on CUDA, where eigvals is not. Equal to torch-fidelity's
    within 1e-4 relative (tests/test_evaluate.py), also with fewer samples than features (S1 singular:
    eigenvalues that are 0 in exact arithmetic come out a rounding error either side and are clamped)."""
    diff = mu1 - mu2
    w, v = torch.linalg.eigh(cov1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root1 @ cov2 @ root1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float(diff @ diff + cov1.trace() + cov2.trace() - 2 * tr_covmean)


def fid(features1: torch.Tensor, features2: torch.Tensor) -> float:
    a = FeatureStats(features1.shape[1], features1.device).add(features1).mean_cov()
    b = FeatureStats(features2.shape[1], features2.device).add(features2).mean_cov()
    return frechet_distance(*a, *b)


def _mmd2_poly(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 with KID's kernel k(a, b) = (a.b / d + 1)^3."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    off = lambda k: k.sum() - k.diagonal().sum()
    return (off(kxx) + off(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / (m * m)


def kid(features1: torch.Tensor, features2: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID's mean and standard deviation over `subsets` random subsets, drawn as torch-fidelity draws
    them (numpy RandomState(seed).choice without replacement, set 1 then set 2)."""
    rng = np.random.RandomState(seed)
    x64, y64 = features1.double(), features2.double()
    mmds = []
    for _ in range(subsets):
        i = torch.from_numpy(rng.choice(len(x64), subset_size, replace=False)).to(x64.device)
        j = torch.from_numpy(rng.choice(len(y64), subset_size, replace=False)).to(y64.device)
        mmds.append(_mmd2_poly(x64[i], y64[j]))
    t = torch.stack(mmds)
    return float(t.mean()), float(t.std(unbiased=False))
