"""Compositing straight-alpha RGBA over a background: how every image (real or generated) is shown
to a feature extractor, and to the domain encoder while it trains. Knows only torch.
"""

from __future__ import annotations

import torch


def background(kind: str, size: int) -> torch.Tensor:
    """3 x size x size float in [0, 1]."""
    if kind == "white":
        return torch.ones(3, size, size)
    if kind == "black":
        return torch.zeros(3, size, size)
    if kind == "gray":
        return torch.full((3, size, size), 0.5)
    cell = max(1, size // 8)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    check = ((yy // cell + xx // cell) % 2).float()
    return (0.6 + 0.3 * check).expand(3, size, size).clone()


def composite(rgba_u8: torch.Tensor, bg: str) -> torch.Tensor:
    """Straight-alpha uint8 N x 4 x H x W -> uint8 N x 3 x H x W over the background."""
    x = rgba_u8.float() / 255.0
    a = x[:, 3:4]
    out = x[:, :3] * a + background(bg, x.shape[-1]).to(x.device) * (1 - a)
    return (out * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def alpha_as_rgb(rgba_u8: torch.Tensor) -> torch.Tensor:
    return rgba_u8[:, 3:4].expand(-1, 3, -1, -1).contiguous()
