"""Feature extractors: which one evaluation uses, and building each without a download when its
weights are local. `resolve(cfg)` decides once, before any training:

- `auto`: decided for the device (issue 33). On a GPU, InceptionV3 (standard FID) when its weights are
  present or can be downloaded, else the domain encoder. On a CPU (or MPS), the domain encoder always:
  InceptionV3 at 299 px costs a CPU minutes per evaluation, more than the main job's whole training.
  InceptionV3's FID of a handed-over generator stays one command away on any device:
  `ganlab eval RUN --set eval.feature_extractor=inception-v3-compat`.
- the domain encoder for this dataset (ganlab/eval/encoder.py: trained on first use, cached by data hash).
- `domain`: the domain encoder, even when InceptionV3's weights are present.
- `inception-v3-compat`: standard InceptionV3; an error without weights.
- `inception-v3-random`: InceptionV3 with random weights. Only when named: it cannot rank good
  generators (docs/metrics.md).
- `dinov2-vit-{s,b,l}-14` (FD_DINOv2, Stein et al. 2023) and `clip-*`: torch-fidelity 0.4's own
  extractors, given a local weights file in `eval.weights` (downloaded by torch-fidelity when online).
- a path: a TorchScript module, uint8 B x 3 x H x W in, B x F features out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_clip import MODEL_URLS as CLIP_MODELS
from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA as DINOV2_MODELS
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ..checkpoint import atomic_write_bytes
from ..errors import UserError
from . import encoder
from .dinov2 import LocalDinoV2

log = logging.getLogger("ganlab")
RANDOM = "inception-v3-random"
COMPAT = "inception-v3-compat"
DOMAIN = "domain"
RANDOM_SEED = 0
RANDOM_WARNING = (
    "evaluating with RANDOM InceptionV3 features: these FID/IS/KID numbers are NOT standard FID, are "
    "comparable only with other runs of the same signature, catch gross collapse but cannot rank good "
    "generators (docs/metrics.md). Use eval.feature_extractor: auto (the domain encoder) or InceptionV3 weights."
)


@dataclass(frozen=True)
class Extractor:
    """The feature extractor a run evaluates with, as resolved before training."""

    name: str  # its name in torch-fidelity's registry
    weights: str  # its weights (or TorchScript) file; "" when torch-fidelity downloads them
    weights_hash: str  # that file's content hash ("download" when there is none yet)
    random: bool = False  # random features: catch gross collapse, cannot rank good generators
    weights_kwarg: str | None = None  # torch-fidelity's feature_extractor_weights_path, where it takes one
    recipe: dict | None = None  # the domain encoder's training recipe (joins the signature)
    files: tuple = ()  # files to log with the run (the domain encoder and its card)
    why: str = ""  # how `auto` chose it (said on the run's start line)


class EvalError(UserError):
    """Evaluation cannot be set up as configured. One line, shown as is."""


def random_inception_weights(path: Path, seed: int = RANDOM_SEED) -> Path:
    """Write (once) an InceptionV3 state dict with variance-preserving random weights: He-normal convs,
    batch-norm as identity. PyTorch's default init with eval-mode batch-norm shrinks activations
    towards zero layer by layer, until every image set has the same features and FID is 0."""
    path = Path(path)
    if path.exists():
        return path
    net = FeatureExtractorInceptionV3.__new__(FeatureExtractorInceptionV3)
    try:
        # torch-fidelity builds every layer first and loads the weights file last; handing it an empty
        # file makes that last step fail, which leaves exactly what is wanted here: the layers, with
        # no download and no weights. Whatever it raises at that point is expected and ignored.
        FeatureExtractorInceptionV3.__init__(net, COMPAT, ["2048"], feature_extractor_weights_path=os.devnull)
    except Exception:
        pass
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("conv.weight") or k == "fc.weight":
            fan_in = v[0].numel()
            gain = 2.0 if k.endswith("conv.weight") else 1.0
            sd[k] = torch.randn(v.shape, generator=g) * (gain / fan_in) ** 0.5
        elif k.endswith("running_var") or k.endswith("bn.weight"):
            sd[k] = torch.ones_like(v)
        elif k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros_like(v)
        else:  # running_mean, bn.bias, fc.bias
            sd[k] = torch.zeros_like(v)
    buf = io.BytesIO()
    torch.save(sd, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


# torch-fidelity's registry holds extractor *classes* and builds them itself, with arguments of its own
# choosing; the only way to hand one a file path is to carry it on the class. resolve_extractor makes a
# subclass at run time with the path as a class attribute (see _register).


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 with ganlab's random weights. channels_last: about 1.8x faster on
    CPU (oneDNN); this extractor is ganlab's own, so no reference numbers depend on its exact rounding."""

    weights_path: str = ""  # set on the run-time subclass

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list, feature_extractor_weights_path=self.weights_path, **kwargs)
        self.to(memory_format=torch.channels_last)


class _TorchScriptExtractor(FeatureExtractorBase):
    """A user's TorchScript module (uint8 Bx3xHxW in, B x F features out) as a torch-fidelity extractor.
    Its output serves FID/KID/PRC as features and IS as logits."""

    script_path: str = ""  # set on the run-time subclass

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.net = torch.jit.load(self.script_path, map_location="cpu").eval()

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        f = self.net(x).float().flatten(1)
        return tuple(f for _ in self.features_list)


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]


def _try_download(timeout: float = 10.0) -> Path | None:
    """Fetch the standard InceptionV3 weights into torch's hub cache, as torch-fidelity would. None if
    there is no network (checked quickly first, so offline machines do not hang)."""
    if not _online():
        return None
    try:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, progress=False, map_location="cpu")
        finally:
            socket.setdefaulttimeout(old)
    except Exception as e:
        log.warning("could not download InceptionV3 weights (%s)", e)
        return None
    return _hub_weights_path() if _hub_weights_path().exists() else None


def _register(name, cls):
    FEATURE_EXTRACTORS_REGISTRY.pop(name, None)  # re-registration with a new path replaces the old one
    register_feature_extractor(name, cls)


def _check_weights(path: Path):
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalError(
            f"eval.weights {str(path)!r} is not a loadable InceptionV3 state dict ({e.__class__.__name__})"
        ) from None
    if not isinstance(sd, dict) or "Mixed_7c.branch_pool.conv.weight" not in sd:
        raise EvalError(f"eval.weights {str(path)!r} does not look like torch-fidelity InceptionV3 weights")


def _online() -> bool:
    if os.environ.get("GANLAB_OFFLINE"):
        return False
    try:
        socket.create_connection(("github.com", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _pretrained(choice: str, weights: str) -> Extractor:
    """dinov2-* and clip-*: torch-fidelity's extractors, from a local weights file (or its download)."""
    if not weights:
        if not _online():
            raise EvalError(f"eval.feature_extractor {choice} needs eval.weights (a local weights file): no network")
        return Extractor(choice, "", "download")
    p = Path(weights).expanduser()
    if not p.is_file():
        raise EvalError(f"eval.weights {weights!r} is not a file")
    h = file_hash(p)
    if choice in DINOV2_MODELS:
        try:
            cls = type(f"LocalDinoV2_{h}", (LocalDinoV2,), {"weights_path": str(p)})
            cls(choice, ["dinov2"])  # fail now, in one line, rather than mid-run
        except Exception as e:
            raise EvalError(
                f"eval.weights {weights!r} is not a DINOv2 ViT-S/B/L-14 state dict ({e.__class__.__name__})"
            ) from None
        _register(f"{choice}-{h}", cls)
        return Extractor(f"{choice}-{h}", str(p), h)
    return Extractor(choice, str(p), h, weights_kwarg=str(p))


def _torchscript(choice: str, prefix: str = "torchscript", h: str = "") -> Extractor:
    """A TorchScript extractor, named and signed by `h` (default: the file's hash)."""
    p = Path(choice).expanduser()
    if not p.is_file():
        raise EvalError(
            f"eval.feature_extractor {choice!r}: expected auto, {DOMAIN}, {COMPAT}, {RANDOM}, "
            f"dinov2-vit-*-14, clip-* or a TorchScript file"
        )
    try:
        torch.jit.load(str(p), map_location="cpu")
    except Exception as e:
        raise EvalError(
            f"eval.feature_extractor {choice!r} is not a loadable TorchScript module ({e.__class__.__name__})"
        ) from None
    h = h or file_hash(p)
    _register(f"{prefix}-{h}", type(f"TorchScript_{h}", (_TorchScriptExtractor,), {"script_path": str(p)}))
    return Extractor(f"{prefix}-{h}", str(p), h)


def _domain(cfg, device, images=None) -> Extractor:
    path, card = encoder.ensure(cfg, device=device, images=images)
    return dataclasses.replace(
        _torchscript(str(path), prefix="domain", h=card["sha256_16"]),
        recipe=dict(card["recipe"], data_hash=card["data_hash"]),
        files=(str(path), str(path.with_suffix(".json"))),
    )


def _inception(weights: str) -> Extractor | None:
    """Standard InceptionV3: the given file, torch's hub cache, or a download; None when none of those."""
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise EvalError(f"eval.weights / GANLAB_INCEPTION_WEIGHTS {weights!r} is not a file")
        _check_weights(p)
        found = p
    else:
        found = _hub_weights_path() if _hub_weights_path().exists() else _try_download()
    if found is None:
        return None
    return Extractor(COMPAT, str(found), file_hash(found), weights_kwarg=str(found))


def standard(cfg, primary: Extractor, device="cpu") -> Extractor | None:
    """InceptionV3 for fid_standard beside a primary extractor that is not InceptionV3, or None:
    eval.standard_fid auto = on a GPU when the weights are present (never downloaded for this; on a CPU
    it would cost more than the run), always = required, on any device."""
    e = cfg.eval
    if e.standard_fid == "never" or primary.name in (COMPAT, RANDOM) or primary.weights_kwarg:
        return None
    if e.standard_fid == "auto" and torch.device(device).type != "cuda":
        return None
    pretrained = e.feature_extractor in DINOV2_MODELS or e.feature_extractor in CLIP_MODELS  # eval.weights is theirs
    weights = ("" if pretrained else e.weights) or os.environ.get("GANLAB_INCEPTION_WEIGHTS", "")
    p = Path(weights).expanduser() if weights else (_hub_weights_path() if _hub_weights_path().exists() else None)
    if p is None or not p.is_file():
        if e.standard_fid == "always":
            raise EvalError(
                "eval.standard_fid is always but InceptionV3's weights are not present "
                "(eval.weights, GANLAB_INCEPTION_WEIGHTS or torch's hub cache)"
            )
        return None
    _check_weights(p)
    return Extractor(COMPAT, str(p), file_hash(p), weights_kwarg=str(p))


def _random(cfg, device, images=None) -> Extractor:
    if cfg.eval.weights:
        raise EvalError(f"eval.feature_extractor is {RANDOM} but eval.weights is set; pick one")
    path = random_inception_weights(Path(cfg.data.cache_dir) / f"{RANDOM}-seed{RANDOM_SEED}.pth")
    _register(RANDOM, type("RandomInception", (_RandomInception,), {"weights_path": str(path)}))
    return Extractor(RANDOM, str(path), file_hash(path), random=True)


def _compat(cfg, device, images=None) -> Extractor:
    found = _inception(cfg.eval.weights or os.environ.get("GANLAB_INCEPTION_WEIGHTS", ""))
    if found is None:
        raise EvalError(
            f"eval.feature_extractor is {COMPAT} but its weights are not available: no network, "
            f"and neither eval.weights nor GANLAB_INCEPTION_WEIGHTS is set"
        )
    return found


def _auto(cfg, device, images=None) -> Extractor:
    """On a GPU: standard InceptionV3 when its weights are here (or can be downloaded), else the domain
    encoder. Elsewhere: the domain encoder (InceptionV3 would cost more than the training it judges)."""
    kind = torch.device(device).type
    if cfg.eval.weights:  # named in the experiment: the user's choice, on any device (a missing file is one line)
        return dataclasses.replace(_compat(cfg, device, images), why="auto with eval.weights: InceptionV3")
    if kind == "cuda":
        found = _inception(cfg.eval.weights or os.environ.get("GANLAB_INCEPTION_WEIGHTS", ""))
        if found is not None:
            return dataclasses.replace(found, why="auto on a GPU: InceptionV3")
        return dataclasses.replace(_domain(cfg, device, images), why="auto: no InceptionV3 weights, the domain encoder")
    return dataclasses.replace(
        _domain(cfg, device, images),
        why=(
            f"auto on a {kind.upper()}: the domain encoder (InceptionV3 at 299 px would cost more than the run; its FID "
            f"of the hand-over: ganlab eval RUN --set eval.feature_extractor={COMPAT})"
        ),
    )


# eval.feature_extractor -> builder(cfg, device, images) -> Extractor. DINOv2 and CLIP names are torch-fidelity's;
# anything else is a TorchScript file.
BUILDERS = {
    "auto": _auto,
    DOMAIN: _domain,
    COMPAT: _compat,
    RANDOM: _random,
    **{
        name: (lambda cfg, device, images=None: _pretrained(cfg.eval.feature_extractor, cfg.eval.weights))
        for name in (*DINOV2_MODELS, *CLIP_MODELS)
    },
}


def resolve(cfg, device="cpu", images=None) -> Extractor:
    """Decide which extractor evaluation uses and register it with torch-fidelity (before any training).
    `images`: the run's loaded ImageSet, which the domain encoder trains on (else it loads it)."""
    choice = cfg.eval.feature_extractor or "auto"
    builder = BUILDERS.get(choice, lambda cfg, device, images=None: _torchscript(choice))
    return builder(cfg, device, images)
