"""Adversarial losses on D's logits, and the gradient penalties. Pure functions of tensors.

bce is the seed's loss (BCE on sigmoid with 1/0 targets; G's loss is the non-saturating
-log D(G(z))), computed on logits so it cannot saturate in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .distributed import SINGLE, Share


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(
            real, torch.full_like(real, real_target)
        ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "lsgan":
        return 0.5 * ((real - real_target) ** 2).mean() + 0.5 * (fake**2).mean()
    if kind == "wgan-gp":
        return fake.mean() - real.mean()
    raise ValueError(f"unknown loss {kind!r}")


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if kind == "lsgan":
        return 0.5 * ((fake - 1) ** 2).mean()
    if kind in ("hinge", "wgan-gp"):
        return -fake.mean()
    raise ValueError(f"unknown loss {kind!r}")


def r1_penalty(d, real: torch.Tensor, pack: int = 1) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): squared gradient norm of D on real data, per input D judges (a pack
    of `pack` samples under PacGAN, whose squared norm is the sum of its samples'), averaged; the caller
    scales by gamma/2. Per sample it would be gamma/pack."""
    real = real.detach().requires_grad_(True)
    out = d(real)
    (grad,) = torch.autograd.grad(out.sum(), real, create_graph=True)
    return grad.pow(2).reshape(real.shape[0] // pack, -1).sum(1).mean()


def gradient_penalty(
    d, real: torch.Tensor, fake: torch.Tensor, generator=None, share: Share = SINGLE, pack: int = 1
) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): (||grad D(x_hat)|| - 1)^2 on random interpolates, per input D
    judges: one interpolation weight per pack of `pack` samples (drawn for the global batch: see
    distributed.Share) and the norm of the pack's gradient."""
    n = real.shape[0]
    eps = share.rand(n // pack, 1, 1, 1, 1, generator=generator, device=real.device).expand(-1, pack, -1, -1, -1)
    eps = eps.reshape(n, 1, 1, 1)
    x = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    out = d(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((grad.reshape(n // pack, -1).norm(dim=1) - 1) ** 2).mean()


def sigmoid_probs(logits: torch.Tensor) -> torch.Tensor:
    """What D 'believes' in [0, 1], for the D(x) / D(G(z)) diagnostics. The sigmoid of the logits for
    every loss, so the numbers line up with the seed's log; collapse detection does not use them
    (a hinge D stops learning at a logit of +-1, sigmoid 0.73, long before sigmoid says 'won')."""
    return torch.sigmoid(logits.float())


# Where D has "won" on one sample, per loss, on its raw output: real above the first number, fake
# below the second. bce: probability 0.95 / 0.05 (logit +-2.944). hinge: the margin, past which D
# gets no gradient. lsgan: within 0.1 of the targets 1 / 0. wgan-gp has no margin: the sign.
MARGINS = {"bce": (2.944, -2.944), "hinge": (1.0, -1.0), "lsgan": (0.9, 0.1), "wgan-gp": (0.0, 0.0)}


def margins(kind: str, label_smoothing: float = 0.0) -> tuple[float, float]:
    """MARGINS, with the real side moved to the smoothed target 1 - s where the loss uses it: a bce D
    is optimal at logit ln((1 - s) / s) (ln 9 = 2.197 for s = 0.1), below the unsmoothed 2.944, so a
    fixed margin could never be passed. Won = within the same distance of the target as without."""
    hi, lo = MARGINS[kind]
    if label_smoothing and kind == "bce":
        p = 1.0 - label_smoothing - 0.05
        hi = math.log(p / (1.0 - p))
    elif label_smoothing and kind == "lsgan":
        hi = 1.0 - label_smoothing - 0.1
    return hi, lo


def past_margin(
    kind: str, real: torch.Tensor, fake: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of real outputs above, and of fake outputs below, the loss's margin (tensors, no sync)."""
    hi, lo = margins(kind, label_smoothing)
    return (real.float() > hi).float().mean(), (fake.float() < lo).float().mean()


# The output at which D's decision flips from fake to real: 0 on logits and critic values, the midpoint
# of lsgan's targets 1 / 0.
DECISION = {"bce": 0.0, "hinge": 0.0, "lsgan": 0.5, "wgan-gp": 0.0}


def ada_rt(kind: str, real: torch.Tensor) -> torch.Tensor:
    """StyleGAN2-ADA's overfitting heuristic E[sign(D(x))] on reals, about the loss's own decision point
    (lsgan's 0.5, not 0: against 0 it stays near 1 whatever D does)."""
    return torch.sign(real.float() - DECISION[kind]).mean()


def accuracy(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Share of reals above and fakes below D's decision threshold, averaged over the two (no sync):
    0.5 when D outputs the same for both, 1 when it separates them, below 0.5 when G fools it."""
    t = DECISION[kind]
    return 0.5 * ((real.float() > t).float().mean() + (fake.float() < t).float().mean())


def lecam(real: torch.Tensor, fake: torch.Tensor, anchor_real: torch.Tensor, anchor_fake: torch.Tensor) -> torch.Tensor:
    """LeCam regularisation (Tseng et al. 2021, google/lecam-gan's lecam_reg): D's outputs on reals
    are pulled towards the anchor of its fake outputs and vice versa, each only from beyond it:
    mean(relu(D(x) - a_F)^2) + mean(relu(a_R - D(G(z)))^2)."""
    return F.relu(real - anchor_fake).pow(2).mean() + F.relu(anchor_real - fake).pow(2).mean()


def consistency(out: torch.Tensor, out_augmented: torch.Tensor) -> torch.Tensor:
    """bCR's term: mean squared difference of D's outputs on images and on their augmented copies."""
    return (out - out_augmented).pow(2).mean()
