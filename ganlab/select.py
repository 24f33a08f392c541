"""Selection policy: best tracking, early stopping, collapse signals and rollback decisions.

A `Selector` sees diagnostics (every `log_every` steps) and metrics (every evaluation) and answers
with a `Decision`. Its whole state is plain data saved in the checkpoint, so a resumed run makes
the same decisions as an uninterrupted one. Knows nothing about how metrics are computed, nor
about files: the loop decides what a rollback restores.

Collapse signals, each once per episode:
- non-finite: a loss, the metric or the weights is NaN or infinite;
- metric: `collapse_evals` evaluations in a row `collapse_factor` times worse than the best;
- D dominance, read per loss from D's raw outputs (never from their sigmoid, which a hinge or WGAN
  D never drives to 0 or 1): for `dominance_window` intervals in a row,
  - bce, hinge, lsgan: at least `dominance_share` of the real and of the fake samples are past the
    loss's margin (losses.MARGINS), and
  - wgan-gp (no margin): the critic gap E[D(x)] - E[D(G(z))] is `dominance_z` robust SDs above its
    recent median, and
  - bce, hinge, wgan-gp: loss_g's worst step of the interval is `dominance_z` robust SDs above the
    recent median of worst steps (a z-score, not a ratio: hinge and WGAN losses can be zero or
    negative). lsgan's G loss is bounded (about 0.5 once D outputs its fake target), so there is no
    spike to see: its margin shares decide alone.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import asdict, dataclass, field

from . import metrics as metrics_mod

HISTORY = 20  # healthy diagnostic intervals that make up the "recent" median
MIN_HISTORY = 5  # intervals needed before a z-score means anything

# Latent seeds, as offsets from eval.seed: the fixed latents (0), the noise band's draws, the keep_top
# re-evaluation. The hand-over score draws from eval.handover_seed, which must avoid all of these.
NOISE_SEED_OFFSET, NOISE_SEEDS = 101, 8
# min_delta: auto. A checkpoint counts as better when it beats the best by more than two evaluations of
# one generator on independent latents differ one time in 20 in that direction: 1.645 x sqrt(2) x SD,
# the SD measured over NOISE_SEEDS fresh draws of the current best. Selection compares evaluations on
# the same fixed latents, whose errors are positively correlated, so this errs on the safe side.
NOISE_BAND_PER_SD = 1.645 * 2**0.5
NOISE_BAND_MOVE = 0.5  # FID's noise grows with its value: measure again once the best has moved by half
REEVAL_SEED_OFFSET = 7919
# Two-sided 95% Student's t by degrees of freedom: a standard error from 3 draws has 2 of them, and
# z = 1.96 would call a real tie a difference far too often (the t for 2 is 4.30)
T_975 = {
    1: 12.71,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
    60: 2.000,
}


def t_975(df: float) -> float:
    """The 97.5% quantile of Student's t at `df` degrees of freedom (the table's next lower entry: wider, never narrower)."""
    if df < 1:
        return T_975[1]
    return next((T_975[k] for k in sorted(T_975, reverse=True) if k <= df), T_975[1]) if df < 120 else 1.96


def selection_seeds(eval_seed: int) -> set:
    """Every latent seed that selection evaluates on (the hand-over score must use none of them)."""
    noise = range(eval_seed + NOISE_SEED_OFFSET, eval_seed + NOISE_SEED_OFFSET + NOISE_SEEDS)
    return {eval_seed, eval_seed + REEVAL_SEED_OFFSET, *noise}


def rank_key(mode: str):
    """Sort key that puts the best value first, for a metric of this mode ("min" or "max")."""
    return (lambda v: v) if mode == "min" else (lambda v: -v)


def within_noise(a: float, se_a: float, b: float, se_b: float, draws: int = 3) -> bool:
    """Two scores with standard errors (each from `draws` latent draws) are a tie when their difference
    is inside Student's t (Welch-Satterthwaite degrees of freedom) standard errors of the difference
    (independent draws: the variances add)."""
    var = se_a**2 + se_b**2
    if var == 0:
        return a == b
    df = round(var**2 / ((se_a**4 + se_b**4) / max(draws - 1, 1)), 6)  # (rounding: 4 - 1e-16 is 4)
    return abs(a - b) <= t_975(df) * math.sqrt(var)


def handover_summary(draws: list[dict]) -> dict:
    """The hand-over score from several latent draws of one generator: per metric the mean
    (`handover_<m>`), the SD of one draw (`_sd`, the latent noise) and the standard error of the
    mean (`_se`, the score's uncertainty)."""
    out = {}
    for m in (k for k in draws[0] if not k.endswith("_std")):  # IS's and KID's own spreads are not scores
        vals = [d[m] for d in draws]
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        out.update(
            {
                f"handover_{m}": statistics.fmean(vals),
                f"handover_{m}_sd": sd,
                f"handover_{m}_se": sd / math.sqrt(len(vals)),
            }
        )
    return out


@dataclass
class Decision:
    improved: bool = False
    stop: str = ""  # why the run must end ("" = carry on)
    rollback: str = ""  # why the run must go back to its best (or first) state ("" = no)
    keep: bool = False  # this evaluation entered the top keep_top: keep its generator
    drop: list = field(default_factory=list)  # steps that left the top keep_top: their generators can go
    events: list = field(default_factory=list)  # (kind, detail, extra dict)


@dataclass
class SelectorState:
    best: float | None = None
    best_step: int = -1
    evals: int = 0
    since_best: int = 0  # evaluations without improvement (patience)
    bad_streak: int = 0  # evaluations in a row worse than best by collapse_factor
    dominance_streak: int = 0
    loss_g_worst: list = field(default_factory=list)  # worst loss_g of recent healthy intervals
    critic_gap: list = field(default_factory=list)  # critic gap of recent healthy intervals
    rollbacks: int = 0
    period: int = 0  # selection periods: a new one starts when the signature changes
    noise_band: float | None = None  # min_delta: auto, measured on the best (see NOISE_BAND_PER_SD)
    noise_band_at: float | None = None  # the best's value when the band was measured
    top: list = field(default_factory=list)  # [value, step] of the keep_top best evaluations, best first


def robust_z(value: float, history: list) -> float:
    """How many robust SDs (1.4826 x the median absolute deviation) `value` lies above the median
    of `history`. The scale has a floor of 5% of the median's size (plus 1e-3), so a history that
    happens to be flat does not turn ordinary jitter into a huge z."""
    med = statistics.median(history)
    mad = statistics.median(abs(h - med) for h in history)
    scale = max(1.4826 * mad, 0.05 * abs(med) + 1e-3)
    return (value - med) / scale


class Selector:
    def __init__(self, config, mode: str, loss: str = "bce"):
        self.config = config  # the selection section of the experiment
        self.mode = mode  # "min" or "max"
        self.loss = loss  # train.loss: which dominance signal applies
        self.state = SelectorState()

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.selection, metrics_mod.mode_of(cfg.selection.metric, cfg.selection.mode), cfg.train.loss)

    # ---- what others may read
    @property
    def best(self) -> float | None:
        return self.state.best

    @property
    def best_step(self) -> int:
        return self.state.best_step

    def top_steps(self) -> set:
        """The steps whose generators selection.keep_top keeps."""
        return {step for _, step in self.state.top}

    @property
    def rollbacks(self) -> int:
        return self.state.rollbacks

    @property
    def lr_scale(self) -> float:
        """Learning-rate multiplier after the rollbacks so far: each one cuts it again (0.5, 0.25, ...)."""
        return self.config.rollback_lr_scale**self.state.rollbacks

    def summary(self) -> dict:
        """The run's selection outcome as metrics (empty before the first best). The selection best is
        the lowest of many noisy evaluations on the run's fixed latents (biased: the winner's curse),
        so it is named as such; runs are compared by their hand-over score (`handover_summary`)."""
        if self.state.best is None:
            return {"rollbacks": self.state.rollbacks}
        return {
            f"selection_best_{self.config.metric}": self.state.best,
            "selection_best_step": self.state.best_step,
            "rollbacks": self.state.rollbacks,
        }

    @property
    def min_delta(self) -> float:
        """selection.min_delta, or with `auto` the measured noise band (0 until it is measured)."""
        d = self.config.min_delta
        return (self.state.noise_band or 0.0) if d == "auto" else d

    def needs_noise_band(self) -> bool:
        """min_delta auto, and no band yet or the best has moved far from where it was measured."""
        s = self.state
        if self.config.min_delta != "auto" or s.best is None:
            return False
        return s.noise_band is None or abs(s.best - s.noise_band_at) > NOISE_BAND_MOVE * abs(s.noise_band_at)

    def set_noise_band(self, values: list[float]) -> float | None:
        """The band from the best's metric over fresh latent draws; None (and the band unchanged) when a
        draw is not finite: a broken generator must not set the band."""
        if len(values) < 2 or not all(math.isfinite(v) for v in values):
            return None
        self.state.noise_band = NOISE_BAND_PER_SD * statistics.stdev(values)
        self.state.noise_band_at = self.state.best
        return self.state.noise_band

    # ---- evaluations
    def better(self, value: float, than: float | None) -> bool:
        if than is None:
            return True
        d = self.min_delta
        return value < than - d if self.mode == "min" else value > than + d

    def _update_top(self, value: float, step: int, dec: Decision):
        """Keep the keep_top best evaluations (raw values: the re-evaluation at the end, not
        min_delta, decides between close ones)."""
        k = self.config.keep_top
        if k <= 1:
            return
        top = sorted(self.state.top + [[value, step]], key=lambda vs: rank_key(self.mode)(vs[0]))
        self.state.top, gone = top[:k], top[k:]
        dec.keep = any(s == step for _, s in self.state.top)
        dec.drop = [s for _, s in gone if s != step]

    def much_worse(self, value: float) -> bool:
        b, f = self.state.best, self.config.collapse_factor
        if b is None:
            return False
        if self.mode == "min":
            # "f times worse" as a ratio only means something above zero; a best at or below zero
            # (a KID can be slightly negative) is worse by f when it is off by (f - 1) times its size
            return value > b * f if b > 0 else value > b + abs(b) * (f - 1) + 1e-12
        return value < b / f

    def on_eval(self, step: int, metrics: dict, finite_weights: bool = True) -> Decision:
        name, s, dec = self.config.metric, self.state, Decision()
        s.evals += 1
        v = float(metrics[name])  # config validation guarantees evaluation computes it
        if not math.isfinite(v) or not finite_weights:
            dec.events.append(
                ("collapse_signal", f"{name}={v} or weights non-finite at step {step}", {"signal": "non_finite"})
            )
            return self._collapse(dec, "non-finite metric or weights")
        refused = self._copies_refused(metrics, step, dec)
        if not refused:  # a checkpoint that copies is neither the best nor kept for the hand-over
            self._update_top(v, step, dec)
        if not refused and self.better(v, s.best):
            prev = s.best
            s.best, s.best_step, s.since_best, s.bad_streak = v, step, 0, 0
            dec.improved = True
            was = f" (was {prev:.4g})" if prev is not None else ""
            dec.events.append(("improved", f"{name} {v:.4g}{was}: best checkpoint written", {name: v}))
            return dec
        s.since_best += 1
        s.bad_streak = s.bad_streak + 1 if self.much_worse(v) else 0
        left = self.config.patience - s.since_best if self.config.patience else None
        best = f"best {s.best:.4g} at step {s.best_step}" if s.best is not None else "no best yet"
        detail = f"{name} {v:.4g}, {best}"
        if left is not None:
            detail += f", patience left {left}"
        dec.events.append(("eval", detail, {name: v, "patience_left": left}))
        if s.bad_streak >= self.config.collapse_evals:
            c = self.config
            dec.events.append(
                (
                    "collapse_signal",
                    f"{name} {v:.4g} is over {c.collapse_factor}x the best {s.best:.4g} for {s.bad_streak} evaluations",
                    {"signal": "metric"},
                )
            )
            s.bad_streak = 0
            return self._collapse(dec, f"{name} degraded {c.collapse_factor}x for {c.collapse_evals} evaluations")
        if self.config.patience and s.since_best >= self.config.patience:
            dec.stop = f"no improvement of {name} in {s.since_best} evaluations (patience {self.config.patience})"
            dec.events.append(("early_stop", dec.stop, {}))
        return dec

    def _copies_refused(self, metrics: dict, step: int, dec: Decision) -> bool:
        """selection.max_copy_share: an evaluation whose copy check (eval/copies.py) is over it cannot
        become the best or enter the top K, however good its score: it may be good by reproducing
        training images."""
        limit, share = self.config.max_copy_share, metrics.get("copy_share")
        if not limit or share is None or share <= limit:
            return False
        dec.events.append(
            (
                "copy_refused",
                f"copy_share {share:.3g} at step {step} is over selection.max_copy_share "
                f"{limit:.3g}: not eligible as best",
                {"copy_share": share},
            )
        )
        return True

    # ---- diagnostics (cheap, between evaluations)
    def on_diagnostics(self, step: int, diag: dict) -> Decision:
        dec, s = Decision(), self.state
        if not all(math.isfinite(diag[k]) for k in ("loss_d", "loss_g")):
            dec.events.append(
                (
                    "collapse_signal",
                    f"non-finite loss at step {step} (loss_d={diag['loss_d']}, loss_g={diag['loss_g']})",
                    {"signal": "non_finite"},
                )
            )
            return self._collapse(dec, "non-finite loss")
        why = self._dominance(diag)
        s.dominance_streak = s.dominance_streak + 1 if why else 0
        if not why:  # the history holds healthy intervals only, so a long spike cannot hide itself
            for hist, v in (
                (s.loss_g_worst, diag.get("loss_g_max", diag["loss_g"])),
                (s.critic_gap, diag.get("critic_gap", 0.0)),
            ):
                hist.append(v)
                del hist[:-HISTORY]
        if self.config.dominance_window and s.dominance_streak == self.config.dominance_window:  # once an episode
            dec.events.append(
                (
                    "collapse_signal",
                    f"D dominates for {s.dominance_streak} intervals ({self.loss}): {why}",
                    {"signal": "d_dominance"},
                )
            )
            return self._collapse(dec, f"discriminator dominance ({why})")
        return dec

    def _dominance(self, diag: dict) -> str:
        """Why this interval looks like a D that has won, or "" when it does not."""
        s, c = self.state, self.config
        if len(s.loss_g_worst) < MIN_HISTORY:
            return ""
        worst = diag.get("loss_g_max", diag["loss_g"])
        z_loss = robust_z(worst, s.loss_g_worst)
        if z_loss < c.dominance_z and self.loss != "lsgan":
            return ""
        spike = (
            f"loss_g up to {worst:.3g}, z {z_loss:.1f} over its recent median {statistics.median(s.loss_g_worst):.3g}"
        )
        if self.loss == "wgan-gp":
            z_gap = robust_z(diag["critic_gap"], s.critic_gap)
            return f"critic gap {diag['critic_gap']:.3g}, z {z_gap:.1f}; {spike}" if z_gap >= c.dominance_z else ""
        real, fake = diag["real_past_margin"], diag["fake_past_margin"]
        if min(real, fake) < c.dominance_share:
            return ""
        return f"{real:.0%} of real and {fake:.0%} of fake samples past the margin; {spike}"

    # ---- collapse
    def _collapse(self, dec: Decision, why: str) -> Decision:
        action = self.config.on_collapse
        if action == "ignore":
            return dec
        if action == "stop":
            dec.stop = f"collapse: {why}"
        elif self.state.rollbacks >= self.config.max_rollbacks:
            dec.stop = f"collapse after {self.state.rollbacks} rollbacks (max_rollbacks): {why}"
        else:
            dec.rollback = why  # to the best state, or to the first one when there is no best yet
        if dec.stop:
            dec.events.append(("early_stop", dec.stop, {}))
        return dec

    def rolled_back(self):
        """The loop restored a known-good state: count it, and start the streaks and the patience
        afresh (the restored weights are the best, so nothing has failed to improve on them yet).
        The histories of healthy intervals stay: they are the baseline a re-collapse right after the
        rollback is measured against (cleared, the next intervals would become the baseline whatever
        they held, and the signals would be blind for MIN_HISTORY intervals)."""
        s = self.state
        s.rollbacks += 1
        s.dominance_streak = s.bad_streak = s.since_best = 0

    def new_period(self):
        """The evaluation signature changed: numbers from the old feature space cannot be compared with
        the new ones, so best, patience and signals start again (rollbacks keep counting)."""
        s = self.state
        self.state = SelectorState(rollbacks=s.rollbacks, period=s.period + 1, evals=s.evals)  # top, band: afresh

    # ---- state
    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, d: dict):
        known = {f.name for f in dataclasses.fields(SelectorState)}  # checkpoints of older versions
        self.state = SelectorState(**{k: v for k, v in d.items() if k in known})
