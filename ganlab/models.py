"""DCGAN generator and discriminator for RGBA images, init schemes, spectral norm, BN statistics.

Configured as the seed (nz=100, widths 64, 64x64, batch norm, no spectral norm) the networks are
layer for layer the user's: G has 3,577,728 parameters and D 2,766,592. D returns logits; the
seed's final Sigmoid lives inside the loss (BCE on logits), which is the same function without the
saturation of log(sigmoid) in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

CHANNELS = 4  # RGBA


def _n_up(image_size: int) -> int:
    n = int(math.log2(image_size)) - 2
    if 2 ** (n + 2) != image_size or n < 1:
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    return n


class Generator(nn.Module):
    def __init__(self, nz=100, width=64, image_size=64):
        super().__init__()
        self.nz = nz
        n = _n_up(image_size)
        ch = [width * 2 ** (n - 1 - i) for i in range(n)]  # 64px, width 64: 512, 256, 128, 64
        layers = [nn.ConvTranspose2d(nz, ch[0], 4, 1, 0, bias=False), nn.BatchNorm2d(ch[0]), nn.ReLU(True)]
        for a, b in zip(ch, ch[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ch[-1], CHANNELS, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z):
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class MinibatchStd(nn.Module):
    """StyleGAN2-ADA's minibatch standard deviation (num_channels 1): each sample gets one more
    feature map, the mean over features of the standard deviation across its group of `group`
    samples (sample i is grouped with i + N/G, i + 2N/G, ...). D can then see a batch's lack of
    variety, which pushes G towards diversity."""

    def __init__(self, group: int):
        super().__init__()
        self.group = group

    def forward(self, x):
        n, c, h, w = x.shape
        g = min(self.group, n)
        if n % g:
            raise ValueError(f"minibatch std: batch {n} does not divide into groups of {g}")
        y = x.float().reshape(g, -1, c, h, w)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()  # std over the group, per feature
        y = y.mean(dim=[1, 2, 3]).reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y.to(x.dtype)], 1)


class Discriminator(nn.Module):
    def __init__(self, width=64, image_size=64, norm="batch", mbstd_group=0, pack=1):
        super().__init__()
        n = _n_up(image_size)
        self.pack = pack
        ch = [width * 2**i for i in range(n)]  # 64px, width 64: 64, 128, 256, 512
        layers = [nn.Conv2d(CHANNELS * pack, ch[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for a, b in zip(ch, ch[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False)]
            if norm == "batch":
                layers += [nn.BatchNorm2d(b)]
            layers += [nn.LeakyReLU(0.2, True)]
        if mbstd_group:
            layers += [MinibatchStd(mbstd_group)]
        layers += [nn.Conv2d(ch[-1] + (1 if mbstd_group else 0), 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        if self.pack > 1:  # PacGAN: m consecutive samples become one input of m x 4 channels
            x = x.reshape(x.shape[0] // self.pack, self.pack * x.shape[1], *x.shape[2:])
        return self.main(x).view(-1)  # logits: one per sample, or per pack


def init_weights(net: nn.Module, scheme: str):
    """normal = the seed's N(0, 0.02) convs and N(1, 0.02) batch-norm scales; the others are the
    schemes the user was told to try, on every weight with more than one dimension."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            w = m.weight
            if scheme == "normal":
                nn.init.normal_(w, 0.0, 0.02)
            elif scheme == "xavier":
                nn.init.xavier_normal_(w)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(w, a=0.2, nonlinearity="leaky_relu")
            elif scheme == "orthogonal":
                nn.init.orthogonal_(w)
            else:
                raise ValueError(f"unknown init {scheme!r}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            if scheme == "normal":
                nn.init.normal_(m.weight, 1.0, 0.02)
            else:
                nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def add_spectral_norm(net: nn.Module):
    for name, m in list(net.named_modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            # ConvTranspose2d keeps its output channels in dim 1
            spectral_norm(m, dim=1 if isinstance(m, nn.ConvTranspose2d) else 0)


def build(
    cfg_model, image_size: int, seed: int | None = None, with_d: bool = True
) -> tuple[Generator, Discriminator | None]:
    """G and D as configured, initialised. with_d=False builds G alone (loading a generator: its
    weights come from a file, so the init is only overwritten). The order below (construct both,
    init both, then spectral norm) is the order the documented runs consumed the RNG in."""
    if seed is not None:
        torch.manual_seed(seed)
    g = Generator(cfg_model.nz, cfg_model.g_width, image_size)
    d = (
        Discriminator(cfg_model.d_width, image_size, cfg_model.d_norm, cfg_model.mbstd_group, cfg_model.pack)
        if with_d
        else None
    )
    for net in (g, d):
        if net is not None:
            init_weights(net, cfg_model.init)
    if cfg_model.spectral_norm and d is not None:
        add_spectral_norm(d)
    if cfg_model.spectral_norm_g:
        add_spectral_norm(g)
    return g, d


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def batch_dependent(net: nn.Module) -> bool:
    """Whether a sample's output depends on the rest of its batch (batch norm, minibatch std): then
    D on a concatenation of real and fake is not D on each."""
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, MinibatchStd)) for m in net.modules())


def spectral_norms(net: nn.Module) -> list[nn.Module]:
    """The spectral-norm parametrization modules of `net` (their training flag decides whether a
    forward runs a power iteration)."""
    from torch.nn.utils.parametrizations import _SpectralNorm

    return [m for m in net.modules() if isinstance(m, _SpectralNorm)]


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def standing_stats(g: nn.Module, nz: int, device, batches: int = 8, batch_size: int = 256, seed: int = 0):
    """Recompute G's batch-norm statistics as an exact average over fresh latents, then leave G in
    eval mode. Training runs G in train mode (batch statistics); the running averages it leaves
    behind lag far behind the weights early in GAN training, so eval-mode samples from them can
    look nothing like what D saw. Standing statistics (as in BigGAN) make sampling match training
    while each sample stays independent of the rest of its batch."""
    bns = [m for m in g.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return g.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes below
    gen = torch.Generator(device=device).manual_seed(seed)
    g.train()
    for _ in range(batches):
        g(torch.randn(batch_size, nz, device=device, generator=gen))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return g.eval()
