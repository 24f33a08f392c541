"""`ganlab features`: a compact domain encoder, trained self-supervised on a dataset's training
split, exported as the TorchScript extractor `eval.feature_extractor` accepts.

Objective: SimCLR's NT-Xent (Chen et al. 2020) between two augmented views of each image, plus a
cross-entropy on the folder's classes when it has more than one (ImageFolder layout). Augmentations
are RGBA-safe: translation and flips move colour and alpha together; brightness, saturation and
contrast touch colour only; alpha damage (erosion, feathering) is *not* an augmentation, so the
encoder stays sensitive to it. Views are composited over the evaluation background, exactly as
evaluation feeds images to an extractor.

The export takes uint8 B x 3 x H x W (any H, W: resized to the encoder's size) and returns B x 256
features. Its file is named by its content hash, with a JSON card beside it: data hash, split,
objective, steps, seed. Held-out images never reach it: it is trained on `ImageSet.train` only.
Status: available by path (`ganlab features` prints it); `eval.feature_extractor: auto` does not
pick it yet, and its validity report (docs/metrics.md) is still to be written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data
from .augment import diff_augment
from .checkpoint import atomic_write_bytes
from .evaluate import composite

log = logging.getLogger("ganlab")

SIZE = 64                 # the encoder's input side
DIM = 256                 # feature size


class Encoder(nn.Module):
    """Four stride-2 convolutions (64 -> 4 px), then a 3x3 at 4 px and a global average pool: 0.98 M
    parameters, about 20 M multiply-adds an image (InceptionV3: 5.7 G)."""

    def __init__(self, n_classes: int = 0):
        super().__init__()
        ch = [3, 32, 64, 128, DIM]
        layers = []
        for a, b in zip(ch, ch[1:]):
            layers += [nn.Conv2d(a, b, 3, 2, 1), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(DIM, DIM, 3, 1, 1), nn.BatchNorm2d(DIM), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(inplace=True), nn.Linear(DIM, 128))   # SimCLR projection
        self.classes = nn.Linear(DIM, n_classes) if n_classes > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float B x 3 x SIZE x SIZE in [-1, 1] -> B x DIM features."""
        return self.body(x).mean(dim=(2, 3))


class Exported(nn.Module):
    """What evaluation runs: uint8 B x 3 x H x W -> B x DIM features, in eval mode."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.body = encoder.body
        self.size = SIZE               # an attribute: TorchScript cannot read module globals

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=[self.size, self.size], mode="bilinear", align_corners=False, antialias=True)
        return self.body(x).mean(dim=(2, 3))


def views(rgba_u8: torch.Tensor, background: str, gen: torch.Generator) -> torch.Tensor:
    """One augmented view per image: RGBA-safe augmentation, then compositing, in [-1, 1]."""
    x = rgba_u8.float() / 127.5 - 1.0
    flip = torch.rand(len(x), generator=gen, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    x = diff_augment(x, ["translation", "color"], gen)          # colour never touches alpha
    u8 = ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)
    out = composite(u8, background).float() / 127.5 - 1.0
    if out.shape[-1] != SIZE:
        out = F.interpolate(out, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return out


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / tau
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def class_labels(names: list[str]) -> tuple[torch.Tensor | None, int]:
    """ImageFolder classes from relative paths (first folder); None with fewer than two."""
    tops = [n.split("/", 1)[0] if "/" in n else "" for n in names]
    classes = sorted(set(tops))
    if len(classes) < 2:
        return None, 0
    idx = {c: i for i, c in enumerate(classes)}
    return torch.tensor([idx[t] for t in tops]), len(classes)


def train_encoder(train_u8: torch.Tensor, labels: torch.Tensor | None, n_classes: int, steps: int = 400,
                  batch_size: int = 128, background: str = "checker", seed: int = 0, device="cpu",
                  progress=None) -> Encoder:
    device = torch.device(device)
    torch.manual_seed(seed)
    enc = Encoder(n_classes).to(device)
    opt = torch.optim.AdamW(enc.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    pick = torch.Generator().manual_seed(seed + 2)
    data_dev = train_u8.to(device)
    for step in range(steps):
        idx = torch.randint(len(train_u8), (batch_size,), generator=pick)
        batch = data_dev[idx.to(device)]
        v1, v2 = views(batch, background, gen), views(batch, background, gen)
        h1, h2 = enc(v1), enc(v2)
        loss = nt_xent(enc.head(h1), enc.head(h2))
        if enc.classes is not None:
            y = labels[idx].to(device)
            loss = loss + 0.5 * (F.cross_entropy(enc.classes(h1), y) + F.cross_entropy(enc.classes(h2), y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None and (step + 1) % 50 == 0:
            progress(step + 1, steps, float(loss))
    return enc.eval()


def export(enc: Encoder, out_dir: Path, card: dict) -> Path:
    """TorchScript file named by its content hash, and its JSON card beside it."""
    import io
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Exported(enc).cpu().eval()), buf)
    blob = buf.getvalue()
    h = hashlib.sha256(blob).hexdigest()[:16]
    path = Path(out_dir) / f"encoder-{h}.pt"
    atomic_write_bytes(path, blob)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps({**card, "sha256_16": h}, indent=2).encode())
    return path


def build(cfg, steps: int = 400, batch_size: int = 128, out_dir: Path | None = None, device="cpu") -> Path:
    """Train on cfg.data's training split and export. Returns the TorchScript path."""
    images = data.load_images(cfg.data, cfg.seed)
    labels, n_classes = class_labels(images.train_names)
    t0 = time.time()
    enc = train_encoder(images.train, labels, n_classes, steps=steps, batch_size=batch_size,
                        background=cfg.eval.background, seed=cfg.seed, device=device,
                        progress=lambda s, n, loss: log.info("encoder step %d/%d loss %.3f", s, n, loss))
    card = {"data_hash": images.content_hash, "holdout_hash": images.holdout_hash, "split": "train",
            "n_train": len(images.train), "objective": "simclr-nt-xent" + ("+classes" if n_classes else ""),
            "classes": n_classes, "steps": steps, "batch_size": batch_size, "seed": cfg.seed,
            "background": cfg.eval.background, "train_seconds": round(time.time() - t0, 1)}
    return export(enc, Path(out_dir or Path(cfg.data.cache_dir) / "encoders"), card)
