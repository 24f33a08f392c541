"""The training step: networks, optimisers, EMA, the training RNG, and the diagnostics of each step.

`Trainer` does one generator update (after `d_steps` discriminator updates) per `step()`.
Everything that varies over time (learning rate, instance-noise level, the batch drawn) is a pure
function of the step, so a resumed run retraces an uninterrupted one exactly. Diagnostics are
summed on the device under their names and read back once per `log_every` steps: no host sync in
the step. Knows nothing about evaluation, selection or tracking.

In a multi-process run (distributed.py) each rank trains on its share of the global batch, G and D
are each wrapped in DDP, and every draw is the global batch's, cut to the rank's rows.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from . import data, distributed, graph_step, losses, models
from .augment import diff_augment
from .device import bf16_supported
from .distributed import SINGLE, Share
from .generator import prepare_for_sampling

log = logging.getLogger("ganlab")


# ------------------------------------------------------------------------------------------ device


def configure_backends(device: torch.device, deterministic: bool):
    """What a GPU user expects: TF32 matmuls and convolutions on the fp32 path (Ampere and newer), and
    cuDNN's autotuner (fixed shapes every step). Neither when determinism was asked for."""
    if device.type != "cuda" or deterministic:
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


# ------------------------------------------------------------------------------------- schedules


def lr_factor(step: int, cfg_train) -> float:
    """Multiplier of the base learning rate at `step`: warm-up, then constant / linear / cosine decay."""
    if cfg_train.lr_warmup and step < cfg_train.lr_warmup:
        return (step + 1) / cfg_train.lr_warmup
    t = min(1.0, step / max(1, cfg_train.steps))
    if cfg_train.lr_schedule == "linear":
        return 1.0 - t
    if cfg_train.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def noise_level(step: int, cfg_train) -> float:
    if not cfg_train.instance_noise:
        return 0.0
    if not cfg_train.instance_noise_anneal:
        return cfg_train.instance_noise
    return cfg_train.instance_noise * max(0.0, 1.0 - step / cfg_train.instance_noise_anneal)


def ema_beta(cfg_train, images_seen: int | None = None) -> float:
    """Decay of G's EMA per step. With train.ema_rampup (StyleGAN2-ADA), the half-life is
    min(ema_halflife, ema_rampup x images seen before this step): early weights, far from the
    current ones, are forgotten fast."""
    if not cfg_train.ema_halflife:
        return 0.0
    half = cfg_train.ema_halflife
    if cfg_train.ema_rampup and images_seen is not None:
        half = min(half, cfg_train.ema_rampup * images_seen)
    return 0.5 ** (cfg_train.batch_size / max(half, 1e-8))


def r1_gamma(cfg) -> float:
    """train.r1_gamma, with auto = StyleGAN2-ADA's heuristic 0.0002 x resolution^2 / batch size
    (0.0128 at 64 px and batch 64)."""
    g = cfg.train.r1_gamma
    return 0.0002 * cfg.data.image_size**2 / cfg.train.batch_size if g == "auto" else float(g)


# ------------------------------------------------------------------------------------- diagnostics

# Summed over an interval and reported as means. d_real / d_fake: sigmoid of D's output (the seed's
# D(x) / D(G(z))). logit_*: D's raw output. *_past_margin: the share of samples on which D has won
# past its loss's margin (losses.MARGINS): what collapse detection reads, whatever the loss.
# D's health (issue 27): ada_rt = E[sign(D(real) - the loss's decision point)] on the reals D trains on
# (StyleGAN2-ADA's overfitting heuristic: 0 when D cannot tell, towards 1 as D memorises the training set);
# d_accuracy = share of reals and fakes on the right side of the loss's decision threshold;
# d_chance = share of steps with d_accuracy at most CHANCE_ACCURACY (D at chance, or fooled).
DIAGNOSTICS = (
    "loss_d",
    "loss_g",
    "d_real",
    "d_fake",
    "logit_real",
    "logit_fake",
    "real_past_margin",
    "fake_past_margin",
    "grad_norm_g",
    "grad_norm_d",
    "ada_rt",
    "d_accuracy",
    "d_chance",
)
CHANCE_ACCURACY = 0.55  # a batch of 64 + 64 at true chance scores 0.5 +- 0.044: above this is signal


class DiagnosticSums:
    """Named per-interval sums, kept as device tensors so that the step never waits for the host.
    `pop()` reads them all back in one transfer, with `loss_g_max`: a loss spike vanishes in an
    interval's mean, so the worst step is kept beside it."""

    def __init__(self, device):
        self.sums = {k: torch.zeros((), device=device) for k in DIAGNOSTICS}
        self.steps = torch.zeros((), device=device)
        self.loss_g_max = torch.full((), float("-inf"), device=device)

    @torch.no_grad()
    def add(self, values: dict):
        torch._foreach_add_([self.sums[k] for k in DIAGNOSTICS], [values[k].detach().float() for k in DIAGNOSTICS])
        self.steps += 1
        torch.maximum(self.loss_g_max, values["loss_g"].detach().float(), out=self.loss_g_max)

    def pop(self) -> dict:
        """Means since the last call, plus loss_g_max (one host sync), and start afresh."""
        *sums, steps, worst = torch.stack([*self.sums.values(), self.steps, self.loss_g_max]).tolist()
        out = {k: v / max(steps, 1.0) for k, v in zip(DIAGNOSTICS, sums)}
        out["loss_g_max"] = worst
        out["critic_gap"] = out["logit_real"] - out["logit_fake"]
        self.reset()
        return out

    def reset(self):
        for v in self.sums.values():
            v.zero_()
        self.steps.zero_()
        self.loss_g_max.fill_(float("-inf"))

    def state_dict(self) -> dict:
        """Saved in last.pt, so that a run stopped in the middle of an interval logs the same means."""
        return {
            "sums": {k: v.cpu() for k, v in self.sums.items()},
            "steps": self.steps.cpu(),
            "loss_g_max": self.loss_g_max.cpu(),
        }

    def load_state_dict(self, s: dict | None):
        self.reset()
        if s is None:
            return
        for k, v in s["sums"].items():
            self.sums[k].copy_(v)
        self.steps.copy_(s["steps"])
        self.loss_g_max.copy_(s["loss_g_max"])


# ----------------------------------------------------------------------------------------- trainer

KNOBS = ("lr_g", "lr_d", "sigma", "ema_weight")  # per-step values a captured step reads from the device


@dataclass(frozen=True)
class Plan:
    """What of a step is decided on the host; a captured step has one graph per plan."""

    r1: tuple  # per D update: whether lazy R1 is due
    first: bool  # the run's first step (LeCam's anchors start from its batch)


class Trainer:
    def __init__(
        self,
        cfg,
        train_images: torch.Tensor,
        device: torch.device,
        share: Share = SINGLE,
        holdout_images: torch.Tensor | None = None,
        static: bool | None = None,
    ):
        """static: the step on static buffers (None = where it is captured as CUDA graphs; True on a CPU
        runs the same step uncaptured, which is how the tests compare it with the plain step)."""
        self.cfg, self.device, self.share = cfg, device, share
        t = cfg.train
        distributed.check_split(t.batch_size, share.world, cfg.model.pack, cfg.model.mbstd_group)
        self.g, self.d = models.build(cfg.model, cfg.data.image_size, seed=cfg.seed)  # the same on every rank
        if t.sync_bn and share.world > 1:
            distributed.sync_batchnorm(self.g)
            distributed.sync_batchnorm(self.d)
        self.g.to(device)
        self.d.to(device)
        configure_backends(device, t.deterministic)
        # Static mode: what varies per step (learning rates, noise level, EMA weight, the batch) lives in
        # device tensors written in place before each step, so that the step can be captured as a CUDA
        # graph (graph_step.py). Eager and graphed steps run the same update() on them.
        self.graph_refusal = graph_step.refusal(t, device, share.world)
        if self.graph_refusal and t.cuda_graph == "on":
            log.warning("train.cuda_graph is on, but the step is not captured: %s; eager steps", self.graph_refusal)
        self.static = (not self.graph_refusal) if static is None else static
        self.knobs = torch.zeros(len(KNOBS), device=device)  # lr_g, lr_d, sigma, ema_weight (static mode)
        self.sigma, self.ema_weight = (self.knobs[2], self.knobs[3]) if self.static else (0.0, 0.0)
        self.opt_g = self._adam(self.g, t.lr_g, self.knobs[0])
        self.opt_d = self._adam(self.d, t.lr_d, self.knobs[1])
        self.staged: list[torch.Tensor] | None = None  # each D update's raw batch (data.Batches.raw)
        self.batches = data.Batches(
            train_images, t.batch_size, cfg.seed, cfg.data.alpha, device, cfg.data.placement, share=share
        )
        # latents, noise, augment: the same seed on every rank, drawn for the global batch (Share)
        self.rng = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.lr_scale = 1.0
        self.use_bf16 = t.precision in ("bf16", "auto") and bf16_supported(device)
        if t.precision == "bf16" and not self.use_bf16:
            log.warning("train.precision is bf16 but %s has no native bf16: training in fp32", device)
        self.mem = torch.channels_last if t.channels_last else torch.contiguous_format
        if t.channels_last:
            self.g.to(memory_format=self.mem)
            self.d.to(memory_format=self.mem)
            # G's first layer sees a 1x1 latent, for which both layouts are the same strides: cuDNN then
            # returns a contiguous weight gradient where Inductor expects channels_last (train.compile on
            # CUDA crashed, issue 32). Nothing to gain from channels_last there: keep it contiguous.
            self.g.main[0].to(memory_format=torch.contiguous_format)
        # EMA, like evaluation, is rank 0's: the other ranks would only keep a copy nobody reads. Copied
        # after the layout change, so G and its EMA match tensor for tensor and the lerp is one kernel
        self.g_ema = copy.deepcopy(self.g).requires_grad_(False) if t.ema_halflife and share.main else None
        # Without batch norm, D of a concatenation is D of each part: one forward on real+fake
        self.lean = t.lean_step and not models.batch_dependent(self.d)
        self.sn_all = models.spectral_norms(self.d)  # the overfit probe holds all of them
        self.sn = self.sn_all if self.lean else []
        self._wrap_networks()
        self.diagnostics = DiagnosticSums(device)
        self.r1_gamma = r1_gamma(cfg)
        # LeCam's anchors: EMAs of D's mean output on reals and on fakes (no host sync to update them)
        self.lecam_anchors = torch.zeros(2, device=device)
        self.probe = (
            None if holdout_images is None else (self._probe_batch(train_images), self._probe_batch(holdout_images))
        )
        self.graphs = graph_step.StepGraphs(self.update, self.rng) if self.static and not self.graph_refusal else None

    def _wrap_networks(self):
        """The callables the step runs G and D through: DDP across processes, torch.compile when asked."""
        compiled = torch.compile if self.cfg.train.compile else (lambda net: net)
        self.g_fwd = compiled(distributed.wrap(self.g, self.device, self.share))
        # the penalties (R1, gradient penalty) differentiate D's gradient: AOTAutograd refuses that
        # double backward, so they run D eagerly (the same module, in the same DDP wrapper)
        self.d_eager = distributed.wrap(self.d, self.device, self.share)
        self.d_fwd = compiled(self.d_eager)
        # D as G's loss sees it: frozen, so outside DDP (it has no gradients to average, and a DDP
        # forward would wait for a backward that never reaches D's weights)
        self.d_for_g = compiled(self.d) if self.share.world > 1 else self.d_fwd

    def _adam(self, net, lr: float, lr_tensor: torch.Tensor) -> torch.optim.Optimizer:
        """Fused Adam on CUDA; in static mode its learning rate is a device tensor (a view of self.knobs)
        and, on CUDA, it is capturable (its step count on the device)."""
        t, cuda = self.cfg.train, self.device.type == "cuda"
        kw = {"fused": True, "capturable": self.static} if cuda else {}
        return torch.optim.Adam(net.parameters(), lr=lr_tensor if self.static else lr, betas=(t.beta1, t.beta2), **kw)

    def _probe_batch(self, u8: torch.Tensor) -> torch.Tensor:
        """A fixed batch (the first rows of a permutation seeded apart from training) for the overfit probe."""
        g = torch.Generator().manual_seed(self.cfg.seed + 7)
        q = self.cfg.model.pack * max(1, self.cfg.model.mbstd_group)  # D's packs and groups must fill up
        idx = torch.randperm(len(u8), generator=g)[: max(q, min(self.cfg.train.batch_size, len(u8)) // q * q)]
        return data.to_model_space(u8[idx], self.cfg.data.alpha).to(self.device).contiguous(memory_format=self.mem)

    # ---- one step
    def autocast(self):
        if not self.use_bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _d_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.train.instance_noise:  # (drawn also once annealed to 0: a graph cannot skip it)
            x = x + self.sigma * self.share.randn(*x.shape, generator=self.rng, device=x.device)
        if self.cfg.train.diffaug:
            x = diff_augment(x, self.cfg.train.diffaug, self.rng, self.share)
        return x.contiguous(memory_format=self.mem)

    def step(self, step: int):
        """One generator update at global step `step` (0-based), preceded by d_steps D updates."""
        self._set_schedule(step)
        self._stage(step)
        plan = self.plan(step)
        if self.graphs is not None:
            self.graphs.run(plan)  # eager for a few warm-up steps, then captured once and replayed
        else:
            self.update(plan)

    def plan(self, step: int) -> Plan:
        t = self.cfg.train
        return Plan(
            r1=tuple(bool(self.r1_gamma) and (step * t.d_steps + k) % t.r1_every == 0 for k in range(t.d_steps)),
            first=step == 0,
        )

    def _set_schedule(self, step: int):
        """The step's learning rates, instance-noise level and EMA weight: pure functions of the step,
        computed on the host; in static mode written into self.knobs in one copy."""
        t = self.cfg.train
        f = lr_factor(step, t) * self.lr_scale
        values = (t.lr_g * f, t.lr_d * f, noise_level(step, t), 1.0 - ema_beta(t, images_seen=step * t.batch_size))
        if self.static:
            # from pageable memory: staged by CUDA before the call returns, no wait for the device
            self.knobs.copy_(torch.tensor(values), non_blocking=True)
            return
        for opt, lr in zip((self.opt_g, self.opt_d), values):
            for grp in opt.param_groups:
                grp["lr"] = lr
        self.sigma, self.ema_weight = values[2], values[3]

    def _stage(self, step: int):
        """Each D update's raw batch where update() reads it: as drawn, or in static mode copied into
        buffers allocated at the first step (before any capture)."""
        d_steps = self.cfg.train.d_steps
        raws = [self.batches.raw(step * d_steps + k) for k in range(d_steps)]
        if not self.static:
            self.staged = raws
        elif self.staged is None:
            self.staged = [r.clone() for r in raws]
        else:
            for buf, r in zip(self.staged, raws):
                buf.copy_(r, non_blocking=True)

    def learning_rates(self) -> tuple[float, float]:
        """lr_g, lr_d of the last step, as numbers (a host sync in static mode: for logging only)."""
        return tuple(float(o.param_groups[0]["lr"]) for o in (self.opt_g, self.opt_d))

    def update(self, plan: Plan):
        """The step's one definition: len(plan.r1) D updates and one G update on the staged batches at
        the set schedule. Run eagerly, or captured and replayed as a CUDA graph (graph_step.py)."""
        t = self.cfg.train
        real_target = 1.0 - t.label_smoothing
        bs = t.batch_size // self.share.world  # this rank's share of the global batch
        for k, r1_due in enumerate(plan.r1):
            real = self.batches.decode(self.staged[k])
            z = self.share.randn(bs, self.cfg.model.nz, generator=self.rng, device=self.device)
            with self.autocast():
                fake = self.g_fwd(z)
                x_real, x_fake = self._d_input(real), self._d_input(fake.detach())
                d_real, d_fake = self._d_outputs(x_real, x_fake)
                loss_d = losses.d_loss(t.loss, d_real.float(), d_fake.float(), real_target)
                if t.lecam_weight:
                    loss_d = loss_d + t.lecam_weight * self._lecam(
                        d_real.float(), d_fake.float(), first=plan.first and k == 0
                    )
                with self._sigma_held():  # the penalties see the sigma of the forward above
                    if t.bcr_weight:
                        loss_d = loss_d + t.bcr_weight * self._bcr(x_real, x_fake, d_real, d_fake)
                    if t.loss == "wgan-gp" and t.gp_lambda:
                        loss_d = loss_d + t.gp_lambda * losses.gradient_penalty(
                            self.d_eager, real, fake, self.rng, self.share, self.cfg.model.pack
                        )
                    if r1_due:
                        loss_d = loss_d + 0.5 * self.r1_gamma * t.r1_every * losses.r1_penalty(
                            self.d_eager, real, self.cfg.model.pack
                        )
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            gn_d = self._clip(self.d, t.clip_norm_d, t.clip_value_d)
            self.opt_d.step()
        # G update on the batch's fake images (as the seed does). D's weights are frozen meanwhile:
        # their gradients would be thrown away, and skipping them saves a third of D's backward.
        with self._d_frozen():
            with self.autocast(), self._sigma_held():
                d_out = self.d_for_g(self._d_input(fake))
                loss_g = losses.g_loss(t.loss, d_out.float())
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
        gn_g = self._clip(self.g, t.clip_norm_g, t.clip_value_g)
        self.opt_g.step()
        if self.g_ema is not None:
            self._update_ema(self.ema_weight)
        real_won, fake_won = losses.past_margin(t.loss, d_real, d_fake, t.label_smoothing)
        accuracy = losses.accuracy(t.loss, d_real, d_fake)
        self.diagnostics.add(
            self._over_ranks(
                {
                    "ada_rt": losses.ada_rt(t.loss, d_real),
                    "d_accuracy": accuracy,
                    "d_chance": (accuracy <= CHANCE_ACCURACY).float(),
                    "loss_d": loss_d,
                    "loss_g": loss_g,
                    "grad_norm_g": gn_g,
                    "grad_norm_d": gn_d,
                    "d_real": losses.sigmoid_probs(d_real).mean(),
                    "d_fake": losses.sigmoid_probs(d_fake).mean(),
                    "logit_real": d_real.float().mean(),
                    "logit_fake": d_fake.float().mean(),
                    "real_past_margin": real_won,
                    "fake_past_margin": fake_won,
                }
            )
        )

    @contextmanager
    def _d_frozen(self):
        self.d.requires_grad_(False)
        try:
            yield
        finally:
            self.d.requires_grad_(True)

    def _d_outputs(self, x_real: torch.Tensor, x_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """D's logits on the real and the fake batch: one forward on both when the step is lean (no
        batch norm: each sample's output depends on that sample alone), else two, as the seed does."""
        if self.lean:  # equal halves (also when D packs samples: PacGAN)
            return self.d_fwd(torch.cat([x_real, x_fake])).chunk(2)
        return self.d_fwd(x_real), self.d_fwd(x_fake)

    def _lecam(self, d_real: torch.Tensor, d_fake: torch.Tensor, first: bool) -> torch.Tensor:
        """LeCam regularisation (Tseng et al. 2021) as google/lecam-gan computes it: the anchors are
        updated with this batch's means (taken as they are at the first step, not pulled from 0),
        then losses.lecam."""
        decay = 0.0 if first else self.cfg.train.lecam_decay
        self.lecam_anchors.lerp_(torch.stack([d_real.mean(), d_fake.mean()]).detach(), 1.0 - decay)
        return losses.lecam(d_real, d_fake, self.lecam_anchors[0], self.lecam_anchors[1])

    def _bcr(self, x_real, x_fake, d_real, d_fake) -> torch.Tensor:
        """Balanced consistency regularisation (Zhao et al. 2021): D's output on an image and on a
        translated copy of it should agree, for reals and fakes alike."""
        t_real, t_fake = (
            diff_augment(x, ["translation"], self.rng, self.share).contiguous(memory_format=self.mem)
            for x in (x_real, x_fake)
        )
        a_real, a_fake = self._d_outputs(t_real, t_fake)
        return losses.consistency(d_real.float(), a_real.float()) + losses.consistency(d_fake.float(), a_fake.float())

    @contextmanager
    def _sigma_held(self, modules=None):
        """Spectral norm's power iteration once per D update (lean step): torch's parametrization
        iterates on every forward in training mode; outside the D update's own forward, its modules
        are put in eval mode, where sigma comes from the vectors the last iteration left."""
        modules = self.sn if modules is None else modules
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for m, flag in zip(modules, was_training):  # each module as it was (a D in eval mode stays so)
                m.train(flag)

    def _over_ranks(self, values: dict) -> dict:
        """Each diagnostic as the global batch's: the mean of the ranks' (equal shares). Every rank
        then holds the same sums, so the selector decides the same on all of them and the sums in
        rank 0's checkpoint are every rank's. One small all-reduce per step, no host sync."""
        if self.share.world == 1:
            return values
        stacked = distributed.mean_over_ranks(
            torch.stack([values[k].detach().float() for k in DIAGNOSTICS]), self.share
        )
        return dict(zip(DIAGNOSTICS, stacked.unbind()))

    @staticmethod
    def _clip(net, max_norm: float, max_value: float) -> torch.Tensor:
        """Clip as configured and return the total gradient norm before clipping (no host sync)."""
        params = [p for p in net.parameters() if p.grad is not None]
        if max_value:
            torch.nn.utils.clip_grad_value_(params, max_value)
        if max_norm:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True).float()
        norms = torch._foreach_norm([p.grad for p in params])
        return torch.linalg.vector_norm(torch.stack(norms)).float()

    @torch.no_grad()
    def _update_ema(self, weight):
        """G's EMA moves `weight` (1 - beta) of the way to G: a float, or in static mode a device tensor
        (lerp would read a tensor weight back to the host, which a graph cannot)."""
        ps, src = list(self.g_ema.parameters()), [p.detach() for p in self.g.parameters()]
        if isinstance(weight, torch.Tensor):
            diffs = torch._foreach_sub(src, ps)
            torch._foreach_mul_(diffs, weight)
            torch._foreach_add_(ps, diffs)
        else:
            torch._foreach_lerp_(ps, src, weight)
        buffers = list(self.g_ema.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(self.g.buffers()))

    def pop_diagnostics(self) -> dict:
        out = self.diagnostics.pop()
        if self.probe is not None:
            out.update(self.overfit_probe())
        return out

    @torch.no_grad()
    def overfit_probe(self) -> dict:
        """D's mean logit on a fixed batch of training reals and on a fixed batch of held-out reals,
        unaugmented, and their gap: a D that memorises its training images scores them above new
        images of the same domain. No gradients, no power iteration, batch-norm statistics untouched."""
        bns = [m for m in self.d.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.momentum = 0.0  # train-mode statistics of the batch, running averages kept
        try:
            with self.autocast(), self._sigma_held(self.sn_all):
                train, held = (self.d(x).float().mean() for x in self.probe)
        finally:
            for m, mom in zip(bns, saved):
                m.momentum = mom
        train, held = torch.stack([train, held]).tolist()
        return {"logit_train_probe": train, "logit_holdout_probe": held, "d_overfit_gap": train - held}

    def weights_finite(self) -> bool:
        nets = list(self.g.parameters()) + list(self.d.parameters())
        return bool(torch.stack([torch.isfinite(p).all() for p in nets]).all())

    # ---- sampling
    def sampling_generator(self) -> torch.nn.Module:
        """A copy of the generator that evaluation and export use: the EMA one when EMA is on, with
        batch-norm statistics prepared as eval.bn_stats says."""
        g = copy.deepcopy(self.g_ema if self.g_ema is not None else self.g).float()
        distributed.local_batchnorm(g)  # rank 0 samples alone: no cross-rank statistics
        g.to(memory_format=torch.contiguous_format)
        return prepare_for_sampling(g, self.cfg, self.device)

    # ---- state
    def state_dict(self) -> dict:
        return {
            "g": self.g.state_dict(),
            "d": self.d.state_dict(),
            "g_ema": self.g_ema.state_dict() if self.g_ema is not None else None,
            "opt_g": _portable(self.opt_g.state_dict()),
            "opt_d": _portable(self.opt_d.state_dict()),
            "lr_scale": self.lr_scale,
            "rng": self.rng.get_state(),
            "diagnostics": self.diagnostics.state_dict(),
            "lecam_anchors": self.lecam_anchors.cpu(),
        }

    def load_state_dict(self, s: dict, rng: bool = True):
        self.g.load_state_dict(s["g"])
        self.d.load_state_dict(s["d"])
        if self.g_ema is not None and s.get("g_ema") is not None:
            self.g_ema.load_state_dict(s["g_ema"])
        _load_optimizer(self.opt_g, s["opt_g"])
        _load_optimizer(self.opt_d, s["opt_d"])
        if self.graphs is not None:
            self.graphs.forget()  # the graphs hold the optimizer's old state tensors
        self.lr_scale = float(s["lr_scale"])
        if "lecam_anchors" in s:
            self.lecam_anchors.copy_(s["lecam_anchors"])
        if rng:  # a resume continues the interval; a rollback starts a new one
            self.rng.set_state(s["rng"])
            self.diagnostics.load_state_dict(s.get("diagnostics"))
        else:
            self.diagnostics.reset()

    def reseed(self, seed: int):
        self.rng.manual_seed(seed)


def _portable(opt_state: dict) -> dict:
    """An optimizer's state_dict with plain-number learning rates (static mode keeps a device tensor)."""
    for grp in opt_state["param_groups"]:
        grp["lr"] = float(grp["lr"])
    return opt_state


def _load_optimizer(opt: torch.optim.Optimizer, state: dict):
    """Load `state` but keep this optimizer's own implementation (fused, capturable, foreach) and its
    learning-rate tensor: a checkpoint from another device or mode carries its own, and the step count
    must sit where this implementation reads it (on the device when fused or capturable)."""
    own = [{k: grp[k] for k in ("lr", "fused", "capturable", "foreach")} for grp in opt.param_groups]
    opt.load_state_dict(state)
    for grp, flags in zip(opt.param_groups, own):
        grp.update(flags)
        on_device = bool(grp["fused"] or grp["capturable"])
        for p in grp["params"]:
            st = opt.state.get(p, {})
            if "step" in st:
                st["step"] = st["step"].to(p.device if on_device else "cpu", torch.float32)


# ------------------------------------------------------------------------------------- RNG states


def global_rng_state() -> dict:
    """Every global RNG as tensors and plain types, so the checkpoint loads with weights_only."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_global_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
