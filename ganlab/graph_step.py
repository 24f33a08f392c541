"""The training step as CUDA graphs: Trainer.update captured once per plan and replayed.

On a GPU the eager step is bound by the host: ~400-500 kernel launches at ~10 us each against ~2.5 ms
of GPU work (issue 32). A CUDA graph replays the whole step with one launch. What makes the step
capturable lives in the Trainer's static mode, not here: every value that changes from step to step
(learning rates, instance-noise level, EMA weight, the batch) sits in a device tensor written in place
before the replay, and Adam is fused and capturable with the learning rate as such a tensor. This
module only decides whether to capture, warms up, captures and replays; Trainer.update stays the one
definition of a step, run eagerly during warm-up and whenever capture is refused.

A *plan* is what of a step is decided on the host (which D steps apply lazy R1, LeCam's first step):
each plan gets its own graph, all sharing one memory pool (they never run at the same time, and no
graph reads memory of the pool that another wrote).

The run's torch.Generator is registered with every graph: each replay advances its Philox offset as
the eager step would, so replays draw new latents and augmentations, from the same stream as eager
steps (checked on CUDA by tests/test_graph_step.py inside scripts/gpu_check.py).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

log = logging.getLogger("ganlab")

WARMUP = 3  # eager steps of each plan before it is captured: optimizer state, cuDNN's autotuner, lazy init


def refusal(cfg_train, device: torch.device, world: int) -> str:
    """Why the step is not captured ("" = it is). train.cuda_graph: auto stays quiet where graphs
    cannot apply at all (a CPU); `on` names every reason."""
    want = cfg_train.cuda_graph
    if want == "off":
        return "off"
    if device.type != "cuda":
        return f"no CUDA device ({device.type})"
    if world > 1:
        return "several processes: DDP's gradient hooks are not captured here"
    if cfg_train.compile:
        return "train.compile is on (compiled code is captured by torch.compile itself)"
    return ""


class StepGraphs:
    """Runs `update(plan)` eagerly for each plan's first WARMUP steps, then captures it and replays."""

    def __init__(self, update, generator: torch.Generator, warmup: int = WARMUP):
        self.update = update  # Trainer.update: the step's one definition
        self.generator = generator  # the run's RNG, registered with each graph
        self.warmup = warmup
        self.graphs: dict = {}
        self.pool = None  # one memory pool for every plan's graph
        self.seen = Counter()
        self.refused = ""  # set once: why capture failed (then every step is eager)
        self.captures = 0

    def run(self, plan):
        graph = self.graphs.get(plan)
        if graph is not None:
            graph.replay()
            return
        if self.refused or self.seen[plan] < self.warmup:
            self.seen[plan] += 1
            self.update(plan)
            return
        if self._capture(plan):
            self.graphs[plan].replay()  # capturing records the work without running it
        else:
            self.update(plan)

    def _capture(self, plan) -> bool:
        try:
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            graph.register_generator_state(self.generator)
            # thread_local: the background checkpoint writer and MLflow's threads may touch CUDA meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.update(plan)
        except Exception as e:  # noqa: BLE001 - any failure to capture means eager steps, said once
            self.refused = f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log.warning("train.cuda_graph: capture refused (%s); training with eager steps", self.refused)
            return False
        self.pool = graph.pool()
        self.graphs[plan] = graph
        self.captures += 1
        return True

    def forget(self):
        """Drop the graphs (after the optimizer's state tensors were replaced: a resume, a rollback);
        the next step of each plan captures again, with no new warm-up."""
        self.graphs.clear()
        self.pool = None
