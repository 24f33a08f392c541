"""DiffAugment (Zhao et al. 2020) for RGBA: differentiable augmentations applied to every image D sees,
real and fake alike. Empty space is filled with transparent black (-1 in model space). Colour ops
touch RGB only: alpha is shape, not colour. Random parameters are drawn per sample through a
distributed.Share, so a rank of a multi-process run draws its rows of the global batch's draw."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import SINGLE, Share


def diff_augment(x: torch.Tensor, ops: list[str], generator=None, share: Share = SINGLE) -> torch.Tensor:
    n, device = x.shape[0], x.device

    def rand(*shape):  # one uniform number per sample (per row of the batch)
        return share.rand(n, *shape, generator=generator, device=device)

    for op in ops:
        x = OPS[op](x, rand)
    return x


def color(x, rand):
    rgb, a = x[:, :3], x[:, 3:]
    rgb = rgb + (rand(1, 1, 1) - 0.5)  # brightness
    mean = rgb.mean(dim=1, keepdim=True)
    rgb = (rgb - mean) * (rand(1, 1, 1) * 2) + mean  # saturation
    mean = rgb.mean(dim=[1, 2, 3], keepdim=True)
    rgb = (rgb - mean) * (rand(1, 1, 1) + 0.5) + mean  # contrast
    return torch.cat([rgb, a], 1)


def translation(x, rand, ratio=0.125):
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = (rand() * (2 * sh + 1)).long() - sh
    ty = (rand() * (2 * sw + 1)).long() - sw
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gy = (gy[None] + tx[:, None, None]).clamp(-1, h)
    gx = (gx[None] + ty[:, None, None]).clamp(-1, w)
    padded = F.pad(x, [1, 1, 1, 1], value=-1.0)
    idx = ((gy + 1) * (w + 2) + (gx + 1)).view(n, 1, h * w).expand(n, x.shape[1], h * w)
    return padded.flatten(2).gather(2, idx).view_as(x)


def cutout(x, rand, ratio=0.5):
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = (rand() * (h + 1 - ch % 2)).long() - ch // 2
    ox = (rand() * (w + 1 - cw % 2)).long() - cw // 2
    gy = torch.arange(h, device=x.device)[None, :, None]
    gx = torch.arange(w, device=x.device)[None, None, :]
    inside = ((gy - oy[:, None, None]).abs() <= ch // 2) & ((gx - ox[:, None, None]).abs() <= cw // 2)
    return torch.where(inside[:, None], torch.full_like(x, -1.0), x)


OPS = {"color": color, "translation": translation, "cutout": cutout}
