"""The one table of metrics: what each is called in ganlab, which `eval.metrics` entry computes it,
torch-fidelity's key for it, and which way is better. Config validation, evaluation, selection and
ranking all read it from here (as stylegan2-ada's metric_main does). Knows nothing about torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # key in ganlab's metrics dict, MLflow metric name
    request: str  # the eval.metrics entry (or eval flag) that computes it
    fidelity_key: str  # torch-fidelity's result key ("" = computed by ganlab)
    mode: str  # "min" or "max": which way is better; "" = a spread, not selectable


TABLE = (
    Metric("fid", "fid", "frechet_inception_distance", "min"),
    Metric("isc", "isc", "inception_score_mean", "max"),
    Metric("isc_std", "isc", "inception_score_std", ""),
    Metric("kid", "kid", "kernel_inception_distance_mean", "min"),
    Metric("kid_std", "kid", "kernel_inception_distance_std", ""),
    Metric("precision", "prc", "precision", "max"),
    Metric("recall", "prc", "recall", "max"),
    Metric("fid_alpha", "fid_alpha", "frechet_inception_distance", "min"),
    # standard InceptionV3 FID beside a non-Inception primary extractor (eval.standard_fid), for papers
    Metric("fid_standard", "standard_fid", "frechet_inception_distance", "min"),
    # the copy check (ganlab/eval/copies.py), beside every evaluation of a run: a warning, not a score
    Metric("copy_share", "copy_quantile", "", ""),
    Metric("copy_nn_ratio", "copy_quantile", "", ""),
)
METRICS = {m.name: m for m in TABLE}
REQUESTS = sorted(
    {m.request for m in TABLE if m.request not in ("fid_alpha", "standard_fid", "copy_quantile")}
)  # eval.metrics choices
# fid_standard exists only where InceptionV3's weights do, which a config cannot promise: reported, not selected on
SELECTABLE = [m.name for m in TABLE if m.mode and m.name != "fid_standard"]


def mode_of(name: str, mode: str = "auto") -> str:
    """min or max; `auto` takes the table's direction (and min for a name it does not know)."""
    if mode != "auto":
        return mode
    m = METRICS.get(name)
    return m.mode if m is not None and m.mode else "min"


def computed(requests, fid_alpha: bool) -> list[str]:
    """The metric names an evaluation with these eval.metrics entries (and eval.fid_alpha) reports."""
    want = set(requests) | ({"fid_alpha"} if fid_alpha else set())
    return [m.name for m in TABLE if m.request in want]
