"""Shared fixtures. Nothing here touches the network: the feature extractors are a tiny TorchScript
net (fast loop tests) and InceptionV3 with random weights written to a temp file (the real
inception-v3-compat code path of torch-fidelity)."""

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

os.environ["GANLAB_OFFLINE"] = "1"  # never try to download InceptionV3 weights in tests
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # MLflow 3 sends usage telemetry over the network
os.environ["DO_NOT_TRACK"] = "true"  # (both also reach the mlflow server / serve subprocesses)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("GANLAB_INCEPTION_WEIGHTS", None)
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="ganlab-torch-home-")  # no InceptionV3 from a hub cache
if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers: one thread each, not every core each,
    torch.set_num_threads(1)  # and so the processes they start (trainings, servers, workers)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from ganlab import config  # noqa: E402
from ganlab.eval import extractors  # noqa: E402


class TinyFeatures(torch.nn.Module):
    """uint8 Bx3xHxW -> B x 32 features, random but fixed weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 16, 3, 2, 1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, 2, 1)

    def forward(self, x):
        x = x.float() / 127.5 - 1
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return x.mean(dim=(2, 3))


@pytest.fixture(scope="session")
def script_extractor(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("extractor") / "tiny.pt"
    torch.jit.script(TinyFeatures()).save(str(p))
    return str(p)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> str:
    """A random-weights InceptionV3 file, passed as eval.weights (the compat code path)."""
    return str(extractors.random_inception_weights(tmp_path_factory.mktemp("weights") / "inception-random.pth"))


def tiny_overrides(tmp_path: Path, extractor: str) -> list[str]:
    return [
        "data.root=builtin:sprites",
        "data.image_size=32",
        "data.sprites=160",
        "data.min_holdout=32",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.nz=16",
        "model.g_width=8",
        "model.d_width=8",
        "train.steps=24",
        "train.batch_size=16",
        "train.log_every=4",
        "train.checkpoint_every=8",
        "train.precision=fp32",  # the same numbers on CPUs with and without native bf16
        "eval.every=8",
        "eval.num_samples=32",
        "eval.batch_size=16",
        "eval.kid_subset_size=16",
        f"eval.feature_extractor={extractor}",
        "tracking.enabled=false",
        f"tracking.runs_dir={tmp_path / 'mlruns'}",
        "selection.keep_top=1",  # loop tests script each evaluation; keep_top's re-evaluation has its own tests
    ]


@pytest.fixture
def tiny_cfg(tmp_path, script_extractor):
    def make(*extra):
        return config.load(None, tiny_overrides(tmp_path, script_extractor) + list(extra))

    return make


def script_evaluations(monkeypatch, values, handover=(1.0, 1.2, 1.4)):
    """The run's evaluations return these FIDs in order (one too many or too few fails the test); the
    hand-over score's draws return `handover`. Generation, selection and checkpoints are real."""
    from ganlab.eval import protocol

    it = iter(values)
    monkeypatch.setattr(protocol.Evaluator, "metrics_for", lambda self, fake, seed=None: {"fid": next(it)})
    monkeypatch.setattr(protocol.Evaluator, "handover_draws", lambda self, g: [{"fid": v} for v in handover])


def selector(*sets):
    """A Selector from config overrides (no run around it)."""
    from ganlab.select import Selector

    return Selector.from_config(config.load(None, list(sets)))


def kinds(run_dir, *wanted):
    """(step, kind) of the run's events of these kinds."""
    from ganlab.events import read_events

    return [(e["step"], e["kind"]) for e in read_events(run_dir) if e["kind"] in wanted]


def free_port() -> int:
    """A loopback port nothing listens on (for a server a test starts, or for a refused connection)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
