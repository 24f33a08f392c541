"""Images in, uint8 RGBA tensors out: find, decode, convert to RGBA, resize, split, cache, batch.

The decoded set is kept as one uint8 N x 4 x H x W tensor (on the GPU when it fits), so the hot path
needs no worker processes and memory grows only by the uint8 size of the set. Conversion to floats
(and premultiplication) happens one batch at a time on the device.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .checkpoint import atomic_write_bytes
from .errors import UserError

log = logging.getLogger("ganlab")

EXTENSIONS = {".png", ".webp", ".gif", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MAX_PIXELS = 64_000_000  # larger images are skipped: a decompression bomb, or not a sprite
DECODER_VERSION = 1  # bump when decoding changes, so stale caches are not reused
BUILTIN = "builtin:sprites"


class DataError(UserError):
    """The data cannot be used at all (empty folder, nothing decodable). One line, shown as is."""


class BadImage(ValueError):
    """One file cannot be used; it is skipped and counted."""


# ------------------------------------------------------------------------------------------- decode


def decode_image(src, size: int, fit: str = "pad") -> np.ndarray:
    """A file path or bytes -> size x size x 4 straight-alpha uint8 array. Raises BadImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
            if img.width * img.height > MAX_PIXELS:
                raise BadImage(f"{img.width}x{img.height} is over the {MAX_PIXELS:,}-pixel limit")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF/WebP: the first frame
            img.load()
            img = ImageOps.exif_transpose(img)
            rgba = to_rgba(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too large ({e})") from None
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        TypeError,
        KeyError,
        IndexError,
        ZeroDivisionError,
        MemoryError,
        Image.UnidentifiedImageError,
    ) as e:
        raise BadImage(f"{e.__class__.__name__}: {e}") from None
    return fit_square(rgba, size, fit)


def to_rgba(img: Image.Image) -> Image.Image:
    """Every PIL mode -> correct RGBA. High-bit-depth greys are rescaled, not clipped."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            peak = 1.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    elif mode == "P" and "transparency" in img.info:
        img = img.convert("PA")
    elif mode == "1":
        img = img.convert("L")
    for via in (None, "LA", "RGB"):  # Pillow converts some modes (La, HSV...) only by way of another
        try:
            return (img.convert(via) if via else img).convert("RGBA")
        except ValueError:
            continue
    raise BadImage(f"unsupported image mode {mode}")


def fit_square(img: Image.Image, size: int, fit: str) -> np.ndarray:
    w, h = img.size
    if w < 1 or h < 1:
        raise BadImage("empty image")
    if w != h:
        if fit == "crop":
            s = min(w, h)
            img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        else:
            s = max(w, h)
            canvas = Image.new("RGBA", (s, s), (0, 0, 0, 0))
            canvas.paste(img, ((s - w) // 2, (s - h) // 2))
            img = canvas
    if img.size != (size, size):
        # Pillow premultiplies RGBA while resampling, so colour does not bleed from transparent pixels.
        img = img.resize((size, size), Image.LANCZOS if img.width > size else Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


# -------------------------------------------------------------------------------------------- find


def find_images(root: str | Path) -> list[Path]:
    """All image files under root, recursively, following links but never around a loop."""
    root = Path(root).expanduser()
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in EXTENSIONS:
                out.append(Path(dirpath) / name)
    return out


# ---------------------------------------------------------------------------------------- built-in


def make_sprites(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Procedural RGBA sprites: discs, rings, squares, triangles and diamonds in two-colour gradients,
    with soft, partly transparent edges on a transparent background. Deterministic in (n, size, seed)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    kind = torch.randint(0, 5, (n,), generator=g)
    cx, cy = (u(n) - 0.5) * 0.5, (u(n) - 0.5) * 0.5
    r = 0.35 + 0.4 * u(n)
    rot = u(n) * math.pi
    soft = 0.02 + 0.12 * u(n)  # edge softness, in units of the half-width
    opacity = 0.6 + 0.4 * u(n)
    c1, c2 = u(n, 3), u(n, 3)
    out = torch.empty(n, 4, size, size, dtype=torch.uint8)
    for i in range(n):
        x, y = xx - cx[i], yy - cy[i]
        c, s = math.cos(rot[i]), math.sin(rot[i])
        xr, yr = c * x + s * y, -s * x + c * y
        k = int(kind[i])
        if k == 0:
            d = torch.sqrt(xr**2 + yr**2) - r[i]  # disc
        elif k == 1:
            d = (torch.sqrt(xr**2 + yr**2) - r[i] * 0.75).abs() - r[i] * 0.25  # ring
        elif k == 2:
            d = torch.maximum(xr.abs(), yr.abs()) - r[i] * 0.8  # square
        elif k == 3:
            d = torch.maximum(-yr - r[i] * 0.5, (yr * 0.5 + xr.abs() * 0.866) - r[i] * 0.5)  # triangle
        else:
            d = xr.abs() + yr.abs() - r[i]  # diamond
        alpha = torch.sigmoid(-d / soft[i]) * opacity[i]
        t = ((yr / (r[i] + 1e-6)).clamp(-1, 1) + 1) / 2  # gradient along the shape
        rgb = c1[i][:, None, None] * (1 - t) + c2[i][:, None, None] * t
        img = torch.cat([rgb, alpha[None]], 0)
        out[i] = (img * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return out


# ------------------------------------------------------------------------------------------- split


def holdout_groups(images: torch.Tensor) -> list[list[int]]:
    """Indices grouped by decoded content (exact duplicates together), the groups sorted by a hash of
    that content: the held-out split takes a prefix of groups, so it depends neither on file names
    nor on file order, adding files barely moves it, and an image filed twice under two names can
    never sit on both sides (which would lower FID and zero the copy check's threshold)."""
    flat = images.reshape(len(images), -1).contiguous().numpy()
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(flat):
        groups.setdefault(hashlib.sha1(row.tobytes()).hexdigest(), []).append(i)
    return [groups[k] for k in sorted(groups)]


def holdout_count(n: int, frac: float, minimum: int) -> int:
    k = int(round(n * frac))
    k = max(k, min(minimum, n // 2))  # at least `minimum` when the set allows, never more than half
    return max(1, min(k, n - 1))


# ------------------------------------------------------------------------------------------ the set


@dataclass
class ImageSet:
    train: torch.Tensor  # uint8 N x 4 x H x W, straight alpha
    holdout: torch.Tensor  # uint8 M x 4 x H x W, never trained on
    source: str
    content_hash: str  # of everything decoded (files' bytes + decode settings)
    holdout_hash: str  # of the held-out pixels
    skipped: list = field(default_factory=list)  # (path, reason)
    train_names: list = field(default_factory=list)  # relative paths of the training images, in order
    duplicates: int = 0  # images that are an exact copy of another (kept on one side)

    def describe(self) -> str:
        s = f"{self.source}: {len(self.train)} train / {len(self.holdout)} held-out images"
        if self.skipped:
            s += f", {len(self.skipped)} skipped"
        if self.duplicates:
            s += f", {self.duplicates} exact duplicate(s)"
        return s


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def load_images(cfg_data, seed: int = 0) -> ImageSet:
    """Decode (or load from the content-hashed cache) and split. Raises DataError on unusable data."""
    if cfg_data.root in ("", BUILTIN):
        images = make_sprites(cfg_data.sprites, cfg_data.image_size, seed=12345)
        names = [f"sprite{i:06d}" for i in range(len(images))]
        h = hashlib.sha256(f"{BUILTIN}|{cfg_data.sprites}|{cfg_data.image_size}|{DECODER_VERSION}".encode())
        return _split(images, names, BUILTIN, h.hexdigest()[:16], [], cfg_data)
    root = Path(cfg_data.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a folder")
    files = find_images(root)
    if not files:
        raise DataError(f"data.root {str(root)!r}: no image files found (looked for {', '.join(sorted(EXTENSIONS))})")
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in files]
    blobs, skipped = _read_all(files, names)
    h = hashlib.sha256(f"{cfg_data.image_size}|{cfg_data.fit}|{DECODER_VERSION}".encode())
    for name, blob in blobs:
        h.update(name.encode() + b"\0" + hashlib.sha256(blob).digest())
    key = h.hexdigest()[:16]
    cache = Path(cfg_data.cache_dir) / f"images-{key}.pt"
    cached = _load_cache(cache)
    if cached is not None:
        images, kept, skipped = cached["images"], cached["names"], [tuple(s) for s in cached["skipped"]]
        log.info("decoded images: cache hit %s", cache)
    else:
        images, kept, bad = _decode_all(blobs, cfg_data.image_size, cfg_data.fit)
        skipped = skipped + bad
        _save_cache(cache, {"images": images, "names": kept, "skipped": [list(s) for s in skipped]})
    if skipped:
        first = "; ".join(f"{p} ({why})" for p, why in skipped[:5])
        log.warning("skipped %d unreadable image file(s), first: %s", len(skipped), first)
    if len(kept) < 2:
        raise DataError(
            f"data.root {str(root)!r}: {len(kept)} usable image(s) of {len(files)} files "
            f"({len(skipped)} skipped); need at least 2"
        )
    return _split(images, kept, str(root), key, skipped, cfg_data)


def _read_all(files, names):
    blobs, skipped = [], []
    for p, name in zip(files, names):
        try:
            data = p.read_bytes()
        except OSError as e:
            skipped.append((name, f"unreadable: {e.strerror or e}"))
            continue
        if not data:
            skipped.append((name, "empty file"))
            continue
        blobs.append((name, data))
    return blobs, skipped


def _decode_all(blobs, size, fit):
    def one(item):
        name, blob = item
        try:
            return name, decode_image(blob, size, fit), None
        except BadImage as e:
            return name, None, str(e)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2))) as ex:
        results = list(ex.map(one, blobs))
    kept = [name for name, arr, _ in results if arr is not None]
    bad = [(name, why) for name, arr, why in results if arr is None]
    arrs = [arr for _, arr, _ in results if arr is not None]
    images = (
        torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
        if arrs
        else torch.zeros(0, 4, size, size, dtype=torch.uint8)
    )
    return images, kept, bad


def _load_cache(path: Path):
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a damaged cache is only a cache: decode again
        log.warning("ignoring unreadable cache %s (%s)", path, e)
        return None


def _save_cache(path: Path, obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:  # a cache that cannot be written only costs time next run
        log.warning("could not write the dataset cache %s (%s)", path, e)


def _split(images, names, source, key, skipped, cfg_data) -> ImageSet:
    groups = holdout_groups(images)
    k = holdout_count(len(names), cfg_data.holdout, cfg_data.min_holdout)
    held, taken = [], 0
    for g in groups:  # whole groups: duplicates stay on one side
        if taken >= k or taken + len(g) > len(names) - 1:
            break
        held += g
        taken += len(g)
    held = sorted(held)
    train = sorted(set(range(len(names))) - set(held))
    duplicates = len(names) - len(groups)
    if duplicates:
        log.warning(
            "%s: %d image(s) are exact duplicates of another (same decoded pixels); each set of "
            "duplicates is kept on one side of the held-out split",
            source,
            duplicates,
        )
    hold_t = images[held]
    return ImageSet(
        train=images[train].contiguous(),
        holdout=hold_t.contiguous(),
        source=source,
        content_hash=key,
        holdout_hash=tensor_hash(hold_t),
        skipped=skipped,
        train_names=[names[i] for i in train],
        duplicates=duplicates,
    )


# ---------------------------------------------------------------------------------- tensors, batches


def to_model_space(u8: torch.Tensor, alpha: str) -> torch.Tensor:
    """uint8 straight RGBA -> float in [-1, 1]; premultiplied zeroes the colour under transparency."""
    x = u8.float().div_(255.0)
    if alpha == "premultiplied":
        x = torch.cat([x[:, :3] * x[:, 3:4], x[:, 3:4]], 1)
    return x.mul_(2).sub_(1)


def to_straight_u8(x: torch.Tensor, alpha: str) -> torch.Tensor:
    """Model output in [-1, 1] -> uint8 straight RGBA (what PNGs hold)."""
    x = (x.float().clamp(-1, 1) + 1) / 2
    if alpha == "premultiplied":
        a = x[:, 3:4]
        rgb = torch.where(a > 1e-4, (x[:, :3] / a.clamp_min(1e-4)).clamp(0, 1), torch.zeros_like(x[:, :3]))
        x = torch.cat([rgb, a], 1)
    return (x * 255 + 0.5).clamp(0, 255).to(torch.uint8)


class Batches:
    """Batch i of the training stream is a pure function of (seed, i): a fresh permutation per epoch,
        seeded by the epoch, so resuming at step s needs no saved data-loader state. `batch_size` is the
    global batch; with a distributed.Share each rank takes its rows of it. Every batch is
        returned on `device`, whether the set is resident there or kept in host memory."""

    def __init__(
        self,
        train_u8: torch.Tensor,
        batch_size: int,
        seed: int,
        alpha: str,
        device,
        placement: str = "auto",
        share=None,
    ):
        n = len(train_u8)
        if n < batch_size:
            raise DataError(
                f"only {n} training images, fewer than one batch of {batch_size}: lower train.batch_size or add images"
            )
        self.device = torch.device(device)
        self.data = place(train_u8, self.device, placement)
        self.resident = self.data.device.type == self.device.type  # ("cuda" != "cuda:0": compare types)
        self.batch_size, self.seed, self.alpha = batch_size, seed, alpha
        self.per_epoch = n // batch_size
        self._epoch, self._perm = None, None
        self.share = share  # a distributed.Share: this rank's rows of each global batch (None = all rows)

    def __call__(self, i: int) -> torch.Tensor:
        return self.decode(self.raw(i))

    def raw(self, i: int) -> torch.Tensor:
        """Batch i before decoding, on the device and always the same shape: its row indices into a
        resident set, or its uint8 rows fetched from a host-resident one. A captured step (graph_step.py)
        copies it into a static buffer and decodes it inside the graph."""
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            # drawn where the set lives: no host draw and blocking copy each epoch on a GPU-resident set
            # (a CUDA generator draws another permutation than the CPU's: the order is per device type)
            g = torch.Generator(device=self.data.device).manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.data), generator=g, device=self.data.device)
            self._epoch = epoch
        idx = self._perm[j * self.batch_size : (j + 1) * self.batch_size]
        if self.share is not None:
            idx = self.share.rows(idx)
        if self.resident:
            return idx
        batch = self.data.index_select(0, idx)
        if self.device.type == "cuda":
            # host-resident set: the uint8 batch (4x smaller than floats) crosses over, from pinned
            # memory so the copy is asynchronous; the caching host allocator keeps each pinned
            # buffer alive until its copy has finished, so the next batch cannot overwrite it
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """raw() -> the model-space batch."""
        return to_model_space(self.data.index_select(0, raw) if self.resident else raw, self.alpha)


def place(u8: torch.Tensor, device: torch.device, placement: str = "auto") -> torch.Tensor:
    """Where the decoded training set lives. auto: on a GPU when it takes under a quarter of its free
    memory, else in host memory; device / host force one or the other."""
    if placement == "host" or device.type == "cpu":
        return u8
    if placement == "device":
        return u8.to(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return u8.to(device) if u8.numel() < 0.25 * free else u8
    return u8.to(device)
