"""Degradations and ranking statistics for checking that a feature space ranks generators
(scripts/metric_check.py writes docs/metrics.md with them; tests/test_encoder.py checks them on a
small fixture). Every function takes and returns straight-alpha uint8 N x 4 x H x W images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .compositing import composite


def blur(u8: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return u8
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-(torch.arange(-r, r + 1).float() ** 2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = u8.float()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, [r, r, 0, 0], mode="replicate"), k.expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(F.pad(x, [0, 0, r, r], mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x.round().clamp(0, 255).to(torch.uint8)


def gaussian_noise(u8: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rgb = u8[:, :3].float() + std * torch.randn(u8[:, :3].shape, generator=g)
    return torch.cat([rgb.round().clamp(0, 255).to(torch.uint8), u8[:, 3:]], 1)


def erode_alpha(u8: torch.Tensor, px: int) -> torch.Tensor:
    if px <= 0:
        return u8
    a = u8[:, 3:].float()
    a = -F.max_pool2d(-a, 2 * px + 1, stride=1, padding=px)
    return torch.cat([u8[:, :3], a.to(torch.uint8)], 1)


def feather_alpha(u8: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.cat([u8[:, :3], blur(u8[:, 3:], sigma)], 1)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        lab = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            if (lab == j).any():
                centres[j] = x[lab == j].mean(0)
    return torch.cdist(x, centres).argmin(1)


def mode_drop(train: torch.Tensor, n: int, keep_frac: float, k: int = 8, seed: int = 0) -> torch.Tensor:
    """n images drawn only from the first round(k * keep_frac) of k pixel-space clusters."""
    small = F.interpolate(composite(train, "checker").float(), size=(16, 16), mode="area").flatten(1) / 255
    lab = kmeans(small, k, seed=seed)
    kept = torch.nonzero(lab < max(1, round(k * keep_frac))).flatten()
    g = torch.Generator().manual_seed(seed + 1)
    return train[kept[torch.randint(len(kept), (n,), generator=g)]]


def monotone(curve, noise: float = 0.0) -> bool:
    """The metric gets worse with the degradation: no level scores better than the one before by more
    than `noise` (a difference inside the metric's own noise is a coin flip on another CPU, not an
    inversion), and the strongest level is worse than none by more than `noise`. noise 0: strictly
    increasing."""
    v = [x for _, x in curve]
    return all(b > a - noise for a, b in zip(v, v[1:])) and v[-1] > v[0] + noise


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(x).argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))
