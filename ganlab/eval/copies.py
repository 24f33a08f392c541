"""The copy check: do generated images sit closer to training images than unseen real images do?

On a few thousand images a generator can lower FID by reproducing training images. In the
evaluation's own feature space (the layer its FID uses):

- the reference: each held-out image's distance to its nearest training image. No model saw these
  images, so this is what "close to the training set" looks like for new images of the domain
  (emoji sets have legitimate near-twins: on twemoji64, 3 of 379 held-out images have a training
  image within a hundredth of the median distance);
- `copy_share`: the share of generated samples nearer to a training image than the
  `eval.copy_quantile` quantile of the reference. Unseen images score about that quantile (0.01);
  a generator that reproduces training images scores higher by the share it reproduces;
- `copy_nn_ratio`: the samples' median nearest-training distance over the held-out images' median.
  Below 1: the samples hug the training images more tightly than new images do.

Validated by scripts/copy_check.py (docs/evaluation.md, "The copy check"): 5% planted exact training
copies among held-out images against none, over seeds.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_write_bytes


def nearest_distances(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Each query's Euclidean distance to its nearest reference row (float64; chunked: N x M can be large)."""
    ref = reference.double()
    return torch.cat([torch.cdist(q.double(), ref).min(dim=1).values for q in queries.split(chunk)])


@dataclass
class CopyReference:
    """What one run compares its samples with: the training features and the held-out distances."""

    train: torch.Tensor  # N x F features of the training split
    holdout_nn: torch.Tensor  # M held-out images' distances to their nearest training image
    quantile: float  # eval.copy_quantile

    @property
    def threshold(self) -> float:
        return float(torch.quantile(self.holdout_nn, self.quantile))

    def degenerate(self) -> str:
        """Why the threshold cannot catch near-copies ("" = it can): too few held-out images for the
        quantile to be more than their minimum, or a quantile at (or within a thousandth of the
        median from) zero, when it catches exact copies only."""
        n = len(self.holdout_nn)
        if n * self.quantile < 1:
            return (
                f"{n} held-out images are too few for eval.copy_quantile {self.quantile} (the threshold is "
                f"their minimum nearest-training distance)"
            )
        if self.threshold <= 1e-3 * float(self.holdout_nn.median()):
            return (
                f"the {self.quantile} quantile of held-out nearest-training distances is {self.threshold:.3g}, "
                f"about 0 (held-out images nearly identical to training images): it catches exact copies only"
            )
        return ""

    def measure(self, features: torch.Tensor) -> dict:
        """copy_share and copy_nn_ratio of a set of (generated) images' features."""
        d = nearest_distances(features, self.train)
        return {
            "copy_share": float((d < self.threshold).double().mean()),
            "copy_nn_ratio": float(d.median() / self.holdout_nn.median().clamp_min(1e-12)),
        }


def reference(train_features: torch.Tensor, holdout_features: torch.Tensor, quantile: float) -> CopyReference:
    return CopyReference(train_features, nearest_distances(holdout_features, train_features), quantile)


def cached_features(path: Path, compute) -> torch.Tensor:
    """Training-split features, computed once per (extractor, images) and written atomically."""
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a damaged cache is recomputed, never trusted
            pass
    f = compute()
    buf = io.BytesIO()
    torch.save(f, buf)
    atomic_write_bytes(path, buf.getvalue())
    return f


def cache_name(fields: dict) -> str:
    return "copycheck-" + hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:16] + ".pt"
