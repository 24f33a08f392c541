"""The domain encoder: a compact feature space for evaluation, trained self-supervised on a dataset's
training split, exported as the TorchScript extractor `eval.feature_extractor` accepts. With
`eval.feature_extractor: auto` and no InceptionV3 weights, evaluation trains one on first use and
caches it by data hash (`ensure`); `ganlab features` trains one by hand.

Objective: SimCLR's NT-Xent (Chen et al. 2020) between two augmented views of each image, plus a
cross-entropy on the folder's classes when it has more than one (ImageFolder layout). Augmentations
are RGBA-safe: translation and flips move colour and alpha together; brightness, saturation and
contrast touch colour only; alpha damage (erosion, feathering) is *not* an augmentation, so the
encoder stays sensitive to it. Views are composited over the evaluation background, exactly as
evaluation feeds images to an extractor.

The export takes uint8 B x 3 x H x W (any H, W: resized to the encoder's side) and returns B x 256
features. Its file is named by its content hash, with a JSON card beside it: data hash, split,
objective, recipe. Held-out images never reach it: it is trained on `ImageSet.train` only.
The validity report (docs/metrics.md, scripts/metric_check.py) shows that it ranks.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock

from .. import data
from ..augment import diff_augment
from ..checkpoint import atomic_write_bytes
from . import encoder_store
from .compositing import composite

log = logging.getLogger("ganlab")
# TorchScript is the extractor format eval.feature_extractor documents (uint8 in, features out; loaded
# in ganlab/eval/extractors.py, which imports this module); torch 2.14 marks jit.load/script/save
# deprecated on every call, which would bury the run's own lines.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)

DIM = 256  # feature size
LR = 2e-3  # AdamW, one-cycle schedule
TAU = 0.2  # NT-Xent temperature
OBJECTIVE = "simclr-nt-xent"


class Encoder(nn.Module):
    """Stride-2 3x3 convolutions down to 4 px, widths doubling to DIM, then a global average pool.
    At 64 px: 0.4 M parameters, about 15 M multiply-adds an image (InceptionV3: 5.7 G)."""

    def __init__(self, size: int, n_classes: int = 0):
        super().__init__()
        downs = max(1, int(math.log2(size // 4)))
        ch = [3] + [max(16, DIM >> (downs - 1 - i)) for i in range(downs)]
        layers = []
        for a, b in zip(ch, ch[1:]):
            layers += [nn.Conv2d(a, b, 3, 2, 1), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        self.size = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(inplace=True), nn.Linear(DIM, 128))  # SimCLR projection
        self.classes = nn.Linear(DIM, n_classes) if n_classes > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float B x 3 x size x size in [-1, 1] -> B x DIM features."""
        return self.body(x).mean(dim=(2, 3))


class Exported(nn.Module):
    """What evaluation runs: uint8 B x 3 x H x W -> B x DIM features, in eval mode."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.body = encoder.body
        self.size = encoder.size

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
    x = diff_augment(x, ["translation", "color"], gen)  # colour never touches alpha
    u8 = ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)
    return composite(u8, background).float() / 127.5 - 1.0


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = TAU) -> torch.Tensor:
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


def recipe(cfg) -> dict:
    """Everything that decides the encoder besides the data: it joins the cache key, the card and the
    evaluation signature."""
    e = cfg.eval
    return {
        "objective": OBJECTIVE,
        "steps": e.encoder_steps,
        "batch_size": e.encoder_batch_size,
        "lr": LR,
        "tau": TAU,
        "dim": DIM,
        "size": cfg.data.image_size,
        "background": e.background,
        "seed": e.encoder_seed,
    }  # its own seed: runs of every training seed share one encoder


def train_encoder(
    train_u8: torch.Tensor, labels: torch.Tensor | None, n_classes: int, rcp: dict, device="cpu", progress=None
) -> Encoder:
    """rcp: a `recipe()`. progress(step, steps, loss) is called every 50 steps."""
    device, steps = torch.device(device), rcp["steps"]
    torch.manual_seed(rcp["seed"])
    enc = Encoder(rcp["size"], n_classes).to(device)
    opt = torch.optim.AdamW(enc.parameters(), lr=rcp["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=rcp["lr"], total_steps=steps, pct_start=0.1)
    gen = torch.Generator(device=device).manual_seed(rcp["seed"] + 1)
    pick = torch.Generator().manual_seed(rcp["seed"] + 2)
    data_dev = train_u8.to(device)
    for step in range(steps):
        idx = torch.randint(len(train_u8), (rcp["batch_size"],), generator=pick)
        batch = data_dev[idx.to(device)]
        h1, h2 = enc(views(batch, rcp["background"], gen)), enc(views(batch, rcp["background"], gen))
        loss = nt_xent(enc.head(h1), enc.head(h2), rcp["tau"])
        if enc.classes is not None:
            y = labels[idx].to(device)
            loss = loss + 0.5 * (F.cross_entropy(enc.classes(h1), y) + F.cross_entropy(enc.classes(h2), y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss = loss.detach()
        if progress is not None and ((step + 1) % 50 == 0 or step + 1 == steps):
            progress(step + 1, steps, loss.item())
    return enc.eval()


def weights_hash(module: nn.Module) -> str:
    """The hash of a module's weights (names, shapes, dtypes, values). A TorchScript archive's own bytes
    will not do: each save writes a random serialization id and renumbered class names, so the same
    weights saved twice hash differently, and two caches would name one encoder twice."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
        h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.float().numpy().tobytes())
    return h.hexdigest()[:16]


def damaged(path: Path) -> str:
    """Why a cached encoder file cannot be trusted ("" = it can): unreadable (truncated, not TorchScript),
    no card beside it, or weights whose hash is not the one in its name (encoder-<hash>.pt)."""
    try:
        module = torch.jit.load(str(path), map_location="cpu")
        json.loads(path.with_suffix(".json").read_text())
    except Exception as e:
        return f"unreadable ({e.__class__.__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    h = weights_hash(module)
    return "" if path.stem == f"encoder-{h}" else f"not what its name says (weights hash {h})"


def export(enc: Encoder, out_dir: Path, card: dict) -> Path:
    """TorchScript file named by the hash of its weights, and its JSON card beside it."""
    buf = io.BytesIO()
    scripted = torch.jit.script(Exported(enc).cpu().eval())
    torch.jit.save(scripted, buf)
    blob = buf.getvalue()
    h = weights_hash(scripted)
    path = Path(out_dir) / f"encoder-{h}.pt"
    atomic_write_bytes(path, blob)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps({**card, "sha256_16": h}, indent=2).encode())
    return path


def build(cfg, out_dir: Path | None = None, device="cpu", images: data.ImageSet | None = None) -> Path:
    """Train on cfg.data's training split with `recipe(cfg)` and export. Returns the TorchScript path."""
    images = images or data.load_images(cfg.data, cfg.seed)
    labels, n_classes = class_labels(images.train_names)
    rcp = recipe(cfg)
    t0 = time.time()
    enc = train_encoder(
        images.train,
        labels,
        n_classes,
        rcp,
        device=device,
        progress=lambda s, n, loss: log.info("domain encoder: step %d/%d, loss %.3f", s, n, loss),
    )
    card = {
        "data_hash": images.content_hash,
        "holdout_hash": images.holdout_hash,
        "split": "train",
        "n_train": len(images.train),
        "classes": n_classes,
        "recipe": rcp,
        "objective": OBJECTIVE + ("+classes" if n_classes else ""),
        "device": torch.device(device).type,
        "train_seconds": round(time.time() - t0, 1),
    }
    return export(enc, Path(out_dir or Path(cfg.data.cache_dir) / "encoders"), card)


def cache_key(images: data.ImageSet, rcp: dict) -> str:
    """What names an encoder everywhere (the local index, the team's tracking store): the data, its
    split and the recipe."""
    return hashlib.sha256(
        json.dumps([images.content_hash, images.holdout_hash, rcp], sort_keys=True).encode()
    ).hexdigest()[:16]


def ensure(cfg, device="cpu", images: data.ImageSet | None = None) -> tuple[Path, dict]:
    """The domain encoder for cfg's data and recipe. Without tracking: the local cache (cache_dir), or
    trained now. With tracking: the team's, from the tracking store (floats differ between CPUs, so
    two machines training "the same" encoder get two feature spaces): this machine's cached or newly
    trained one is published when nobody has claimed one (encoder_store.py). Returns (path, card). A
    lock keeps two workers on one machine from training the same one at once."""
    images = images or data.load_images(cfg.data, cfg.seed)
    key = cache_key(images, recipe(cfg))
    root = Path(cfg.data.cache_dir) / "encoders"
    index = root / "index" / f"{key}.json"
    index.parent.mkdir(parents=True, exist_ok=True)

    def train() -> Path:
        log.info(
            "training the domain encoder for %s (first use; %d steps on %s; cached by data hash)",
            images.describe(),
            cfg.eval.encoder_steps,
            torch.device(device).type,
        )
        return build(cfg, out_dir=root, device=device, images=images)

    with FileLock(str(index) + ".lock"):
        local = _indexed(index, root)
        if not cfg.tracking.enabled:
            path = local or train()
        else:
            try:
                path = encoder_store.team_encoder(cfg, key, root, local, train, damaged)
            except encoder_store.StoreUnreachable as e:
                if local is None:
                    raise
                log.warning("%s. Using this machine's cached encoder %s, not checked against the team's", e, local.name)
                path = local
            if local is not None and path != local:
                log.warning(
                    "domain encoder: this machine's cache held %s, the team's is %s (tracking store): "
                    "switching; scores computed with the old one carry its signature and rank apart",
                    local.name,
                    path.name,
                )
        atomic_write_bytes(index, json.dumps({"file": path.name}).encode())
    return path, json.loads(path.with_suffix(".json").read_text())


def _indexed(index: Path, root: Path) -> Path | None:
    """The encoder file the local index names, when it is sound (a damaged one is said and dropped)."""
    if not index.exists():
        return None
    path = root / json.loads(index.read_text())["file"]
    why = damaged(path) if path.exists() else "missing"
    if why:
        log.warning("domain encoder %s is %s: fetching or training it again", path, why)
        return None
    return path
