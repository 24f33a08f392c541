"""Experiment configuration: a typed schema, YAML files with `extends`, `--set` overrides, validation.

The config is plain data (nested dataclasses). Every field carries its allowed values or range in
its metadata, so validation, the README's schema table and the did-you-mean hints all come from
one place. Knows nothing about torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import metrics as metrics_mod
from .errors import ConfigError, UserError  # noqa: F401  (callers catch config.ConfigError / config.UserError)


def _f(default, doc, choices=None, lo=None, hi=None, lo_open=False, words=()):
    """A schema field: its default, a one-line doc, and what values are allowed (`words`: strings a
    number field also takes, e.g. auto)."""
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "words": words}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    root: str = _f(
        "builtin:sprites", "image folder (recursive, or ImageFolder layout); builtin:sprites = procedural RGBA sprites"
    )
    image_size: int = _f(64, "side of the square training images", choices=[32, 64, 128])
    fit: str = _f("pad", "how non-square images become square", choices=["pad", "crop"])
    alpha: str = _f(
        "premultiplied", "colour under transparency: premultiplied removes it", choices=["premultiplied", "straight"]
    )
    holdout: float = _f(
        0.1, "fraction of images held out for evaluation (never trained on)", lo=0.0, hi=0.9, lo_open=True
    )
    min_holdout: int = _f(256, "held-out images at least, when the set allows", lo=1)
    sprites: int = _f(4096, "number of built-in sprites", lo=64)
    cache_dir: str = _f(".ganlab_cache", "decoded-dataset and real-statistics cache (content-hashed)")
    placement: str = _f(
        "auto",
        "where the training set lives: auto = on the GPU if under 25% of its free memory",
        choices=["auto", "device", "host"],
    )


@dataclass
class ModelConfig:
    arch: str = _f("dcgan", "network family", choices=["dcgan"])
    nz: int = _f(100, "latent size", lo=1)
    g_width: int = _f(64, "generator width (seed: 64, i.e. 512 channels at 4x4 for 64x64)", lo=4)
    d_width: int = _f(64, "discriminator width (seed: 64)", lo=4)
    init: str = _f("normal", "weight init", choices=["normal", "xavier", "kaiming", "orthogonal"])
    spectral_norm: bool = _f(False, "spectral normalisation on D's convolutions")
    spectral_norm_g: bool = _f(False, "spectral normalisation on G's convolutions")
    d_norm: str = _f("batch", "D's normalisation layers", choices=["batch", "none"])
    mbstd_group: int = _f(
        0,
        "minibatch standard deviation before D's last conv, over groups of this many samples (StyleGAN2-ADA: 4; 0 = off)",
        lo=0,
    )
    pack: int = _f(
        1,
        "PacGAN: D judges this many samples stacked along channels (1 = off; train.batch_size must divide by it)",
        lo=1,
    )


@dataclass
class TrainConfig:
    steps: int = _f(2000, "generator updates", lo=1)
    batch_size: int = _f(64, "images per batch", lo=2)
    loss: str = _f("bce", "adversarial loss", choices=["bce", "hinge", "lsgan", "wgan-gp"])
    lr_g: float = _f(2e-4, "generator learning rate", lo=0.0, lo_open=True)
    lr_d: float = _f(2e-4, "discriminator learning rate (TTUR: set it apart from lr_g)", lo=0.0, lo_open=True)
    beta1: float = _f(0.5, "Adam beta1", lo=0.0, hi=1.0)
    beta2: float = _f(0.999, "Adam beta2", lo=0.0, hi=1.0)
    lr_schedule: str = _f(
        "constant", "learning-rate schedule, a pure function of the step", choices=["constant", "linear", "cosine"]
    )
    lr_warmup: int = _f(0, "linear warm-up steps", lo=0)
    d_steps: int = _f(1, "discriminator updates per generator update", lo=1)
    clip_norm_g: float = _f(0.0, "clip G's gradient total L2 norm to this (0 = off)", lo=0.0)
    clip_norm_d: float = _f(0.0, "clip D's gradient total L2 norm to this (0 = off)", lo=0.0)
    clip_value_g: float = _f(0.0, "clip each G gradient element to +-this (0 = off)", lo=0.0)
    clip_value_d: float = _f(0.0, "clip each D gradient element to +-this (0 = off)", lo=0.0)
    instance_noise: float = _f(0.0, "std of Gaussian noise added to D's real and fake inputs (0 = off)", lo=0.0)
    instance_noise_anneal: int = _f(0, "steps over which instance noise decays linearly to 0 (0 = constant)", lo=0)
    label_smoothing: float = _f(0.0, "one-sided: real target 1 - this (bce only)", lo=0.0, hi=0.5)
    r1_gamma: float = _f(
        0.0,
        "R1 penalty weight on real images (0 = off; auto = StyleGAN2-ADA's 0.0002 x image_size^2 / batch_size)",
        lo=0.0,
        words=("auto",),
    )
    r1_every: int = _f(1, "lazy R1: apply every N D steps (scaled by N)", lo=1)
    gp_lambda: float = _f(10.0, "gradient-penalty weight for wgan-gp", lo=0.0)
    ema_halflife: int = _f(0, "EMA of G's weights, half-life in images (0 = off)", lo=0)
    ema_rampup: float = _f(
        0.0, "EMA ramp: half-life = min(ema_halflife, this x images seen) (StyleGAN2-ADA: 0.05; 0 = off)", lo=0.0
    )
    lecam_weight: float = _f(
        0.0, "LeCam regularisation of D (Tseng et al. 2021) weight (0 = off; the paper: 0.3)", lo=0.0
    )
    lecam_decay: float = _f(0.99, "LeCam: decay of the EMA anchors of D's mean real and fake outputs", lo=0.0, hi=1.0)
    bcr_weight: float = _f(
        0.0,
        "balanced consistency regularisation (bCR, Zhao et al. 2021) weight on reals and fakes (0 = off; the paper: 10)",
        lo=0.0,
    )
    diffaug: list = _f([], "DiffAugment ops applied to D's inputs", choices=["translation", "cutout", "color"])
    precision: str = _f(
        "auto",
        "auto = bf16 where the device computes it natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32; bf16 = autocast, falling back to fp32 with a warning",
        choices=["auto", "fp32", "bf16"],
    )
    lean_step: bool = _f(
        True,
        "without batch norm in D: one D forward on real+fake, spectral norm's power iteration once per D update (false = the reference step: docs/benchmarks.md)",
    )
    channels_last: bool = _f(True, "channels_last memory format (same math; faster convolutions on CPU and GPU)")
    compile: bool = _f(False, "torch.compile the networks")
    cuda_graph: str = _f(
        "auto",
        "capture the step as CUDA graphs and replay them (docs/benchmarks.md): auto = on CUDA in a single-process run without train.compile, one line naming why when it is refused; off = eager steps",
        choices=["auto", "on", "off"],
    )
    sync_bn: bool = _f(
        False,
        "with several processes (--nproc, torchrun): batch-norm statistics over the global batch instead of each rank's share",
    )
    device: str = _f("auto", "auto picks cuda, then mps, then cpu", choices=["auto", "cpu", "cuda", "mps"])
    log_every: int = _f(50, "steps between diagnostics (averaged over the interval)", lo=1)
    checkpoint_every: int = _f(500, "steps between `last` checkpoints", lo=1)
    deterministic: bool = _f(False, "deterministic algorithms (exact resume on GPU; slower)")


@dataclass
class EvalConfig:
    every: int = _f(1000, "steps between evaluations (0 = only at the end)", lo=0)
    every_images: int = _f(0, "if set, evaluate every this many training images instead", lo=0)
    max_share: float = _f(
        0.0,
        "skip a periodic evaluation while evaluating has taken more than this share of the wall time, each skip an event (0 = off: which steps are evaluated then never depends on the machine's speed)",
        lo=0.0,
        hi=1.0,
    )
    num_samples: int = _f(1000, "generated images per evaluation (fixed latents)", lo=2)
    batch_size: int = _f(100, "feature-extractor batch size (FID depends on it)", lo=1)
    metrics: list = _f(["fid", "isc", "kid"], "metrics to compute", choices=metrics_mod.REQUESTS)
    fid_alpha: bool = _f(True, "also FID on the alpha channel alone")
    standard_fid: str = _f(
        "auto",
        "also standard InceptionV3 FID (fid_standard) beside another extractor: auto = when its weights are present",
        choices=["auto", "always", "never"],
    )
    background: str = _f("checker", "what RGBA is composited over", choices=["white", "black", "gray", "checker"])
    feature_extractor: str = _f(
        "auto",
        "auto (InceptionV3 with weights, else the domain encoder) | domain | inception-v3-compat | inception-v3-random | dinov2-vit-s-14/b-14/l-14 | clip-* | path to a TorchScript extractor",
    )
    weights: str = _f("", "local weights file of the named extractor (InceptionV3: or $GANLAB_INCEPTION_WEIGHTS)")
    encoder_steps: int = _f(300, "domain encoder: training steps (its recipe joins the signature)", lo=1)
    encoder_batch_size: int = _f(128, "domain encoder: images per step (two views each)", lo=2)
    copy_quantile: float = _f(
        0.01,
        "copy check: a sample nearer a training image than this quantile of held-out images are counts as a copy (0 = off)",
        lo=0.0,
        hi=0.5,
    )
    kid_subset_size: int = _f(1000, "KID subset size (clamped to the sample counts)", lo=2)
    bn_stats: str = _f("standing", "batch-norm statistics when sampling", choices=["standing", "running", "batch"])
    seed: int = _f(1234, "seed of the fixed evaluation latents")
    encoder_seed: int = _f(
        0, "domain encoder: its training seed (not the run's seed: runs of every seed share one encoder)"
    )
    handover_samples: int = _f(0, "hand-over score: generated images per draw (0 = 2 x num_samples)", lo=0)
    handover_draws: int = _f(3, "hand-over score: latent draws averaged; their spread is its uncertainty", lo=2)
    handover_seed: int = _f(
        1000003, "hand-over score: seed of its first draw (draws use this seed + 0, 1, ...; never a selection seed)"
    )


@dataclass
class SelectionConfig:
    metric: str = _f(
        "fid", "metric that picks the best checkpoint (one that eval computes)", choices=metrics_mod.SELECTABLE
    )
    mode: str = _f(
        "auto", "min or max; auto takes the metric's direction (ganlab/metrics.py)", choices=["auto", "min", "max"]
    )
    min_delta: float = _f(
        0.0,
        "improvement smaller than this does not count; auto = the metric's measured noise band",
        lo=0.0,
        words=("auto",),
    )
    keep_top: int = _f(
        3,
        "keep the K best checkpoints; at the end re-evaluate them (fresh latents, 2x samples) and hand over the winner (1 = off)",
        lo=1,
    )
    patience: int = _f(0, "evaluations without improvement before stopping (0 = never)", lo=0)
    on_collapse: str = _f("rollback", "what a collapse signal does", choices=["rollback", "stop", "ignore"])
    collapse_factor: float = _f(
        1.5, "an evaluation this many times worse than the best is a bad one (docs/selection.md: the replay)", lo=1.0
    )
    collapse_evals: int = _f(2, "bad evaluations in a row that signal collapse", lo=1)
    dominance_share: float = _f(
        0.9, "D dominates when this share of real and of fake samples is past the loss's margin ...", lo=0.0, hi=1.0
    )
    dominance_z: float = _f(
        6.0,
        "... and loss_g's worst step (wgan-gp: and the critic gap) is this many robust SDs above its recent median",
        lo=0.0,
        lo_open=True,
    )
    dominance_window: int = _f(2, "diagnostic intervals in a row that D must dominate (0 = off)", lo=0)
    rollback_lr_scale: float = _f(
        0.5, "learning rates are multiplied by this at each rollback", lo=0.0, hi=1.0, lo_open=True
    )
    max_copy_share: float = _f(
        0.0,
        "an evaluation whose copy_share (eval.copy_quantile) is over this cannot become the best (0 = off)",
        lo=0.0,
        hi=1.0,
    )
    max_rollbacks: int = _f(3, "after this many rollbacks, the next collapse stops the run", lo=0)


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "log to MLflow")
    uri: str = _f("", "MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    runs_dir: str = _f("mlruns", "where run folders (checkpoints, events) live")
    register_model: bool = _f(True, "register the best generator in the Model Registry")
    system_metrics: bool = _f(True, "log CPU/memory/GPU usage")
    system_metrics_every: float = _f(10.0, "seconds between system-metric samples", lo=0.5)


@dataclass
class Config:
    name: str = _f("ganlab", "experiment name (MLflow experiment)")
    seed: int = _f(0, "seed of everything random in training")
    variant: str = _f("", "a readable label for this run (sweeps set it)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "selection": SelectionConfig,
    "tracking": TrackingConfig,
}


# ---------------------------------------------------------------------------------------------- load


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where 1e-4 and 2.5e3 (no dot, or no exponent sign) are strings.
    A researcher means a number: this loader also reads those forms as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """Safe YAML (no python tags) with every float form a researcher types: 1e-4, 1E-4, 2.5e+3, .5."""
    return yaml.load(text, Loader=_Loader)


def load(path: str | os.PathLike | None = None, overrides: list[str] | tuple = (), check_paths=True) -> Config:
    """Experiment file (with `extends`) + `--set key=value` overrides -> validated Config."""
    raw: dict = {}
    src = "<defaults>"
    if path is not None:
        raw = _read_with_extends(Path(path), seen=())
        src = str(path)
    apply_overrides(raw, overrides)
    cfg = from_dict(raw, src)
    if check_paths:
        check_data_root(cfg, src)
        check_extractor(cfg, src)
    return cfg


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such experiment file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an experiment must be a YAML mapping of sections, got a {type(data).__name__}")
    return data


def _read_with_extends(path: Path, seen: tuple) -> dict:
    path = path.resolve() if path.exists() else path
    if path in seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: key 'extends' must be a file path, got {parent!r}")
    base = _read_with_extends((path.parent / parent), seen + (path,))
    return _deep_merge(base, data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def as_override(key: str, value) -> str:
    """KEY=VALUE as `--set` reads it back (sweeps, studies)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return f"{key}={text}"


def apply_overrides(raw: dict, overrides) -> dict:
    """Apply `key=value` strings (values parsed as YAML) to a raw config mapping, in place."""
    for ov in overrides:
        key, value = _parse_override(ov)
        _set_dotted(raw, key, value, f"--set {ov}")
    return raw


def _parse_override(ov: str) -> tuple[str, Any]:
    if "=" not in ov:
        raise ConfigError(f"--set {ov}: expected KEY=VALUE, e.g. --set train.batch_size=128")
    key, text = ov.split("=", 1)
    try:
        value = parse_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value, where: str):
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"{where}: '{p}' is not a section")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


# ------------------------------------------------------------------------------------------ validate


def from_dict(raw: dict, src: str = "<dict>") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: an experiment must be a YAML mapping, got a {type(raw).__name__}")
    cfg = _build(Config, raw, src, prefix="")
    _check_selection_metric(cfg, src)
    _check_handover_seeds(cfg, src)
    _check_pack(cfg, src)
    return cfg


def _check_selection_metric(cfg: Config, src: str):
    """A selection metric that evaluation never computes would fail at the first evaluation, hours in."""
    have = metrics_mod.computed(cfg.eval.metrics, cfg.eval.fid_alpha)
    m = cfg.selection.metric
    if m not in have:
        need = metrics_mod.METRICS[m].request
        how = "eval.fid_alpha=true" if need == "fid_alpha" else f"'{need}' in eval.metrics"
        raise ConfigError(
            f"{src}: key 'selection.metric' is {m!r}, which eval does not compute "
            f"(it computes {', '.join(have) or 'nothing'}); add {how} or pick one of those"
        )


def eval_interval(cfg: Config) -> int:
    """Steps between periodic evaluations (0 = only at the end): eval.every_images when set, else eval.every.
    The run and tune's pruner (its resource unit) both read it here."""
    if cfg.eval.every_images:
        return max(1, cfg.eval.every_images // cfg.train.batch_size)
    return cfg.eval.every


def _check_pack(cfg: Config, src: str):
    unit = cfg.model.pack * max(1, cfg.model.mbstd_group)
    if cfg.train.batch_size % unit:
        raise ConfigError(
            f"{src}: model.pack {cfg.model.pack} x model.mbstd_group {cfg.model.mbstd_group} = {unit} does not "
            f"divide train.batch_size {cfg.train.batch_size}: D judges whole packs in whole groups"
        )


def _check_handover_seeds(cfg: Config, src: str):
    """The hand-over score must come from latents that selection never saw."""
    from .select import selection_seeds

    used = selection_seeds(cfg.eval.seed) & set(
        range(cfg.eval.handover_seed, cfg.eval.handover_seed + cfg.eval.handover_draws)
    )
    if used:
        raise ConfigError(
            f"{src}: key 'eval.handover_seed' {cfg.eval.handover_seed} draws latent seeds {sorted(used)} "
            f"that selection uses (eval.seed {cfg.eval.seed}); pick another eval.handover_seed"
        )


# Keys of earlier versions that no longer mean anything: a saved run's config.yaml that has them still
# loads (say, for --resume), with a warning, instead of failing on an "unknown key".
RETIRED = {
    "selection.dominance_d_real": "collapse detection reads the share of D's outputs past the loss's margin (selection.dominance_share)",
    "selection.dominance_d_fake": "collapse detection reads the share of D's outputs past the loss's margin (selection.dominance_share)",
    "selection.dominance_loss_ratio": "loss spikes are a robust z-score now (selection.dominance_z)",
}


def _build(cls, raw: dict, src: str, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in [k for k in raw if f"{prefix}{k}" in RETIRED]:
        logging.getLogger("ganlab").warning(
            "%s: ignoring retired key '%s%s': %s", src, prefix, key, RETIRED[f"{prefix}{key}"]
        )
        raw = {k: v for k, v in raw.items() if k != key}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; allowed: {', '.join(fields)}"
            raise ConfigError(f"{src}: unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        hint = hints[name]
        value = raw[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{src}: '{prefix}{name}' must be a section (mapping), got {value!r}")
            kwargs[name] = _build(hint, value, src, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", hint, f.metadata, value, src)
    return cls(**kwargs)


def _check_value(key: str, hint, meta: dict, value, src: str):
    where = f"{src}: key '{key}'"
    if isinstance(value, str) and value in meta.get("words", ()):
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            also = "".join(f" or {w}" for w in meta.get("words", ()))
            raise ConfigError(f"{where} must be a number{also}, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
    elif hint is str:
        if value is None:
            value = ""
        if isinstance(value, bool) and {"on", "off"} <= set(meta.get("choices") or ()):
            value = "on" if value else "off"  # YAML reads a bare on / off as true / false
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    elif hint is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if value is None:
            value = []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of names, got {value!r}")
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if choices is not None:
        for v in value if isinstance(value, list) else [value]:
            if v not in choices:
                close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
                hint_ = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}; got {v!r}{hint_}")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(
            f"{where} must be {op} {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {value!r}"
        )
    if hi is not None and value > hi:
        raise ConfigError(f"{where} must be <= {hi}, got {value!r}")
    return value


def check_data_root(cfg: Config, src: str = "<config>"):
    root = cfg.data.root
    if root in ("", "builtin:sprites"):
        return
    if root.startswith("builtin:"):
        raise ConfigError(f"{src}: key 'data.root' names an unknown built-in set {root!r}; allowed: builtin:sprites")
    if not Path(root).expanduser().is_dir():
        raise ConfigError(f"{src}: key 'data.root' is {root!r}, which is not a folder of images")


NAMED_EXTRACTORS = ("auto", "domain", "inception-v3-compat", "inception-v3-random")  # and dinov2-*, clip-*


def check_extractor(cfg: Config, src: str = "<config>"):
    """eval.feature_extractor: a name ganlab knows, a torch-fidelity DINOv2 / CLIP name, or a TorchScript
    file that exists. A typo fails here, before a sweep or a study starts, not when its Evaluator is
    built (ganlab/eval/extractors.py checks the weights and loads the file)."""
    v = cfg.eval.feature_extractor
    if v in NAMED_EXTRACTORS or v.startswith(("dinov2-vit-", "clip-")):
        return
    if Path(v).expanduser().is_file():
        return
    near = difflib.get_close_matches(v, NAMED_EXTRACTORS, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise ConfigError(
        f"{src}: key 'eval.feature_extractor' is {v!r}{hint}: expected one of {', '.join(NAMED_EXTRACTORS)}, "
        f"dinov2-vit-s-14/b-14/l-14, clip-*, or a TorchScript file that exists"
    )


# ------------------------------------------------------------------------------------ write / flatten


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config | dict, prefix: str = "") -> dict[str, Any]:
    """Stable dotted keys, e.g. {'train.batch_size': 64}; lists become comma-joined strings."""
    d = to_dict(cfg) if not isinstance(cfg, dict) else cfg
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = ",".join(map(str, v)) if isinstance(v, list) else v
    return out


def schema_rows() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, doc) for every field: the README's schema table comes from here."""
    rows = []
    for f in dataclasses.fields(Config):
        sub = SECTIONS.get(f.name)
        for g in dataclasses.fields(sub) if sub else [f]:
            key = f"{f.name}.{g.name}" if sub else f.name
            m = g.metadata
            allowed = ", ".join(map(str, m["choices"])) if m.get("choices") else _range_text(m)
            default = g.default_factory() if g.default is dataclasses.MISSING else g.default
            rows.append((key, repr(default), allowed, m.get("doc", "")))
    return rows


def _range_text(m) -> str:
    lo, hi = m.get("lo"), m.get("hi")
    if lo is None and hi is None:
        return ""
    left = ("> " if m.get("lo_open") else ">= ") + str(lo) if lo is not None else ""
    return left + (f", <= {hi}" if hi is not None else "") + "".join(f", or {w}" for w in m.get("words", ()))


def metric_mode(cfg: Config) -> str:
    """min or max for the selection metric."""
    return metrics_mod.mode_of(cfg.selection.metric, cfg.selection.mode)
