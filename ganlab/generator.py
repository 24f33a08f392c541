"""The generator as a product: made ready to sample, run on latents, exported, loaded back.

`generate` is the one way latents become images (evaluation, sample grids, `ganlab sample`,
scripts): latents -> G -> straight-alpha uint8 RGBA on the CPU, in batches. `export_generator`
writes the file a run hands over (generator.pt, plus generator.safetensors for other tools);
`load_generator` reads it, or a best/last checkpoint, back. Knows nothing about training loops,
evaluation or tracking.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint, data, models
from . import config as config_mod


def prepare_for_sampling(g: nn.Module, cfg, device) -> nn.Module:
    """Batch-norm as eval.bn_stats says: standing statistics (recomputed, then eval mode), the
    running averages (eval mode) or per-batch statistics (train mode)."""
    mode = cfg.eval.bn_stats
    if mode == "standing":
        return models.standing_stats(g, cfg.model.nz, device, seed=cfg.eval.seed + 1)
    g.train(mode == "batch")
    return g


@torch.no_grad()
def generate(
    g: nn.Module, latents: torch.Tensor, alpha: str, device, batch_size: int = 256, to_cpu: bool = True
) -> torch.Tensor:
    """latents (N x nz, any device) through g -> straight uint8 RGBA N x 4 x H x W on the CPU (or left
    on `device`: evaluation composites and extracts there)."""
    device = torch.device(device)
    out = [data.to_straight_u8(g(z.to(device, non_blocking=True)), alpha) for z in latents.split(batch_size)]
    out = torch.cat(out)
    return out.cpu() if to_cpu else out


def export_generator(
    path: Path,
    g: nn.Module,
    cfg,
    step: int,
    metrics: dict,
    signature: str,
    safetensors: bool = True,
    handover_signature: str = "",
):
    """The generator a run hands over: sampling-ready weights (EMA, batch-norm prepared), its step and
    metrics, and what is needed to rebuild it. Loads with weights_only. A safetensors copy of the
    weights (with the same facts as string metadata) is written beside it for other tools."""
    path = Path(path)
    weights = {k: v.detach().cpu().contiguous() for k, v in g.state_dict().items()}
    state = {
        "kind": "ganlab-generator",
        "step": step,
        "metrics": metrics,
        "signature": signature,
        "handover_signature": handover_signature,  # set once the run's hand-over score is in metrics
        "config": config_mod.to_yaml(cfg),
        "state_dict": weights,
        "bn_train_mode": cfg.eval.bn_stats == "batch",
    }
    checkpoint.save(path, state)
    if safetensors:
        _write_safetensors(path.with_suffix(".safetensors"), weights, state)


def _write_safetensors(path: Path, weights: dict, state: dict):
    from safetensors.torch import save as st_save

    meta = {
        "kind": state["kind"],
        "step": str(state["step"]),
        "signature": str(state["signature"]),
        "handover_signature": state["handover_signature"],
        "metrics": json.dumps(state["metrics"]),
        "config": state["config"],
        "bn_train_mode": str(state["bn_train_mode"]).lower(),
    }
    checkpoint.atomic_write_bytes(path, st_save(weights, metadata=meta))


def load_generator(path: str | Path, device="cpu") -> tuple[nn.Module, dict]:
    """A generator.pt / generator.safetensors (or a best/last checkpoint) -> (generator ready to
    sample, info with step, metrics, config, signature)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, device)
    state = checkpoint.load(path, map_location="cpu")
    cfg = config_mod.from_dict(config_mod.parse_yaml(state["config"]), str(path))
    g, _ = models.build(cfg.model, cfg.data.image_size, with_d=False)
    if state.get("kind") == "ganlab-generator":
        g.load_state_dict(state["state_dict"])
        g.to(device).train(bool(state.get("bn_train_mode")))
        info = {
            "step": state["step"],
            "metrics": state["metrics"],
            "config": cfg,
            "signature": state.get("signature"),
            "handover_signature": state.get("handover_signature", ""),
        }
        return g, info
    tr = state["trainer"]
    g.load_state_dict(tr["g_ema"] if tr.get("g_ema") is not None else tr["g"])
    g = prepare_for_sampling(g.to(device), cfg, torch.device(device))
    best = state.get("best") or {}
    return g, {
        "step": state["step"],
        "metrics": best.get("metrics", {}),
        "config": cfg,
        "signature": state.get("signature"),
    }


def _load_safetensors(path: Path, device) -> tuple[nn.Module, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(path))
    except Exception as e:
        raise checkpoint.CheckpointError(f"{path}: not a readable safetensors file ({e.__class__.__name__})") from None
    if meta.get("kind") != "ganlab-generator":
        raise checkpoint.CheckpointError(f"{path}: a safetensors file without ganlab's generator metadata")
    cfg = config_mod.from_dict(config_mod.parse_yaml(meta["config"]), str(path))
    g, _ = models.build(cfg.model, cfg.data.image_size, with_d=False)
    g.load_state_dict(weights)
    g.to(device).train(meta.get("bn_train_mode") == "true")
    return g, {
        "step": int(meta["step"]),
        "metrics": json.loads(meta["metrics"]),
        "config": cfg,
        "signature": meta["signature"],
        "handover_signature": meta.get("handover_signature", ""),
    }
