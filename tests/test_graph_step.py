"""The step on static buffers (what a CUDA graph captures) against the plain step, the learning rate as
a device tensor, and capture refused. The CUDA tests run inside scripts/gpu_check.py on a lent GPU."""

import copy
import logging

import pytest
import torch

from ganlab import config, data, graph_step, trainer

# every per-step value a graph must read from the device: an lr schedule with warm-up, annealed
# instance noise, an EMA with ramp-up, lazy R1 (two plans), LeCam's first step, DiffAugment's draws
MOVING = [
    "train.lr_schedule=cosine",
    "train.lr_warmup=3",
    "train.instance_noise=0.1",
    "train.instance_noise_anneal=6",
    "train.ema_halflife=500",
    "train.ema_rampup=0.05",
    "train.r1_gamma=1.0",
    "train.r1_every=2",
    "train.lecam_weight=0.3",
    "train.diffaug=[translation,cutout,color]",
    "train.steps=8",
]
TINY = [
    "data.sprites=256",
    "data.min_holdout=32",
    "data.image_size=32",
    "model.nz=16",
    "model.g_width=8",
    "model.d_width=8",
    "model.spectral_norm=true",
    "model.d_norm=none",
    "train.batch_size=16",
    "train.precision=fp32",
    "tracking.enabled=false",
]


def make(sets, device="cpu", **kw):
    cfg = config.load(None, TINY + MOVING + list(sets))
    return trainer.Trainer(cfg, data.load_images(cfg.data).train, torch.device(device), **kw)


def nets(tr):
    return {
        f"{name}.{k}": v.detach().float().cpu()
        for name, net in (("g", tr.g), ("d", tr.d), ("g_ema", tr.g_ema))
        if net is not None
        for k, v in net.state_dict().items()
    }


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run(tr, steps):
    for s in range(steps):
        tr.step(s)
    return tr


def test_the_static_buffer_step_equals_the_plain_step(tmp_path):
    """The step a graph captures (schedule in device tensors, batches copied into static buffers, Adam
    reading its learning rate from a tensor) trains the same weights as the plain step. The tolerance is
    float32 rounding of the learning rate (a tensor holds it in float32, the plain step a Python double)
    compounded over 8 Adam steps; a wrong schedule, batch or draw is off by 1e-3 or more."""
    plain, static = make([], static=False), make([], static=True)
    assert static.static and not plain.static and static.graphs is None  # a CPU: no capture
    a, b = nets(run(plain, 8)), nets(run(static, 8))
    assert max_diff(a, b) < 1e-5
    da, db = plain.pop_diagnostics(), static.pop_diagnostics()
    assert da.keys() == db.keys() and all(abs(da[k] - db[k]) < 1e-4 for k in da)
    # the contrast: one more plain step moves the weights by far more than the tolerance
    plain.step(8)
    assert max_diff(nets(plain), b) > 1e-3


def test_a_static_step_reads_its_learning_rate_from_the_device_tensor():
    """The schedule and rollback's scale reach Adam through the tensor, written in place each step:
    a scale of 0 leaves every weight where it was (Adam moves by lr x its update)."""
    tr = make(["train.ema_halflife=0", "train.lecam_weight=0"], static=True)
    run(tr, 3)
    lr_g, lr_d = tr.learning_rates()
    t = tr.cfg.train
    assert lr_g == pytest.approx(t.lr_g * trainer.lr_factor(2, t), rel=1e-6)
    assert lr_d == pytest.approx(t.lr_d * trainer.lr_factor(2, t), rel=1e-6)
    assert tr.opt_g.param_groups[0]["lr"].data_ptr() == tr.knobs.data_ptr()  # a view, not a copy
    tr.lr_scale = 0.5
    tr.step(3)
    assert tr.learning_rates()[0] == pytest.approx(0.5 * t.lr_g * trainer.lr_factor(3, t), rel=1e-6)
    before = nets(tr)
    tr.lr_scale = 0.0
    tr.step(4)
    after = nets(tr)
    weights = [k for k in before if k.startswith(("g.", "d.")) and k.endswith(("weight", "bias", "original"))]
    moved = [k for k in weights if not torch.equal(before[k], after[k])]
    assert len(weights) >= 8
    assert not moved, moved


def test_a_checkpoint_moves_between_the_static_and_the_plain_step(tmp_path):
    """last.pt holds plain learning rates, and each optimizer keeps its own implementation on load."""
    static = run(make([], static=True), 4)
    state = static.state_dict()
    assert all(isinstance(g["lr"], float) for g in state["opt_g"]["param_groups"])
    plain = make([], static=False)
    plain.load_state_dict(copy.deepcopy(state))  # (as from disk: a state_dict shares the live tensors)
    again = make([], static=True)
    again.load_state_dict(copy.deepcopy(state))
    plain.step(4)
    again.step(4)
    assert max_diff(nets(plain), nets(again)) < 1e-5
    assert again.opt_g.param_groups[0]["lr"].data_ptr() == again.knobs.data_ptr()


def test_capture_refused_gives_eager_steps_with_one_line(caplog):
    """Capture that fails (here: no CUDA) is said once, naming why, and every step runs eagerly."""
    calls = []
    graphs = graph_step.StepGraphs(calls.append, torch.Generator(), warmup=1)
    if torch.cuda.is_available():
        pytest.skip("capture works here")
    with caplog.at_level(logging.WARNING, logger="ganlab"):
        for _ in range(4):
            graphs.run("plan")
    assert calls == ["plan"] * 4 and not graphs.graphs and graphs.refused
    lines = [r.getMessage() for r in caplog.records if "cuda_graph" in r.getMessage()]
    assert len(lines) == 1 and "capture refused" in lines[0] and "eager" in lines[0]


def test_cuda_graph_on_without_cuda_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="ganlab"):
        tr = make(["train.cuda_graph='on'"])
    assert not tr.static and tr.graphs is None
    lines = [r.getMessage() for r in caplog.records if "cuda_graph" in r.getMessage()]
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert graph_step.refusal(tr.cfg.train, torch.device("cuda"), world=2).startswith("several processes")


# ------------------------------------------------------------------------------------ on a GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in scripts/gpu_check.py)")


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_replays_equal_eager_steps_on_cuda(precision):
    """Captured and replayed (3 warm-up steps per plan, then replays of both plans) == the same static step
    run eagerly, deterministic kernels on both sides. Equal within 1e-4 in fp32 (the same kernels and the
    same Philox stream: replays draw new latents, else the weights would part at the first replay); bf16
    within its rounding."""
    sets = ["train.deterministic=true", f"train.precision={precision}"]
    eager = make(sets, "cuda", static=True)
    eager.graphs = None
    graphed = make(sets, "cuda")
    assert graphed.graphs is not None
    steps = 12
    a, b = nets(run(eager, steps)), nets(run(graphed, steps))
    assert graphed.graphs.captures == 2 and not graphed.graphs.refused
    assert max_diff(a, b) < (1e-4 if precision == "fp32" else 2e-2), max_diff(a, b)
    da, db = eager.pop_diagnostics(), graphed.pop_diagnostics()
    assert all(abs(da[k] - db[k]) < 1e-2 * max(1.0, abs(da[k])) for k in da), (da, db)


@cuda
def test_compile_trains_on_cuda():
    """train.compile on CUDA (it crashed in G's backward while G's first layer was channels_last)."""
    tr = make(["train.compile=true", "train.precision=bf16", "train.r1_gamma=0"], "cuda")
    run(tr, 3)
    assert tr.weights_finite()
