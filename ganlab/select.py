"""Selection policy: best tracking, early stopping, collapse signals and rollback decisions.

A `Selector` sees diagnostics (every `log_every` steps) and metrics (every evaluation) and answers
with a `Decision`. Its whole state is plain data saved in the checkpoint, so a resumed run makes
the same decisions as an uninterrupted one. Knows nothing about how metrics are computed.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

from .config import metric_mode

HISTORY = 20      # diagnostic intervals that make up loss_g's "recent median"


@dataclass
class Decision:
    improved: bool = False
    stop: str = ""                     # why the run must end ("" = carry on)
    rollback: str = ""                 # why the run must go back to best ("" = no rollback)
    events: list = field(default_factory=list)   # (kind, detail, extra dict)


@dataclass
class SelectorState:
    best: float | None = None
    best_step: int = -1
    evals: int = 0
    since_best: int = 0                # evaluations without improvement
    bad_streak: int = 0                # evaluations in a row worse than best by collapse_factor
    dominance_streak: int = 0
    loss_g_history: list = field(default_factory=list)
    rollbacks: int = 0


class Selector:
    def __init__(self, cfg_selection, mode: str):
        self.c = cfg_selection
        self.mode = mode               # "min" or "max"
        self.s = SelectorState()

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.selection, metric_mode(cfg))

    # ---- evaluations
    def better(self, value: float, than: float | None) -> bool:
        if than is None:
            return True
        return value < than - self.c.min_delta if self.mode == "min" else value > than + self.c.min_delta

    def much_worse(self, value: float) -> bool:
        b, f = self.s.best, self.c.collapse_factor
        if b is None:
            return False
        if self.mode == "min":
            return value > b * f if b > 0 else value > b + abs(b) * (f - 1) + 1e-12
        return value < b / f

    def on_eval(self, step: int, metrics: dict, finite_weights: bool = True) -> Decision:
        name = self.c.metric
        dec = Decision()
        s = self.s
        s.evals += 1
        if name not in metrics:
            raise KeyError(f"selection.metric '{name}' is not among the evaluated metrics {sorted(metrics)}")
        v = float(metrics[name])
        if not math.isfinite(v) or not finite_weights:
            dec.events.append(("collapse_signal", f"{name}={v} or weights non-finite at step {step}", {"signal": "non_finite"}))
            return self._collapse(dec, "non-finite metric or weights")
        if self.better(v, s.best):
            prev = s.best
            s.best, s.best_step, s.since_best, s.bad_streak = v, step, 0, 0
            dec.improved = True
            was = f" (was {prev:.4g})" if prev is not None else ""
            dec.events.append(("improved", f"{name} {v:.4g}{was}: best checkpoint written", {name: v}))
            return dec
        s.since_best += 1
        s.bad_streak = s.bad_streak + 1 if self.much_worse(v) else 0
        left = self.c.patience - s.since_best if self.c.patience else None
        detail = f"{name} {v:.4g}, best {s.best:.4g} at step {s.best_step}"
        if left is not None:
            detail += f", patience left {left}"
        dec.events.append(("eval", detail, {name: v, "patience_left": left}))
        if s.bad_streak >= self.c.collapse_evals:
            dec.events.append(("collapse_signal", f"{name} {v:.4g} is over {self.c.collapse_factor}x the best "
                               f"{s.best:.4g} for {s.bad_streak} evaluations", {"signal": "metric"}))
            s.bad_streak = 0
            return self._collapse(dec, f"{name} degraded {self.c.collapse_factor}x for {self.c.collapse_evals} evaluations")
        if self.c.patience and s.since_best >= self.c.patience:
            dec.stop = f"no improvement of {name} in {s.since_best} evaluations (patience {self.c.patience})"
            dec.events.append(("early_stop", dec.stop, {}))
        return dec

    # ---- diagnostics (cheap, between evaluations)
    def on_diagnostics(self, step: int, diag: dict) -> Decision:
        dec = Decision()
        s = self.s
        if not all(math.isfinite(diag[k]) for k in ("loss_d", "loss_g")):
            dec.events.append(("collapse_signal", f"non-finite loss at step {step} (loss_d={diag['loss_d']}, "
                               f"loss_g={diag['loss_g']})", {"signal": "non_finite"}))
            return self._collapse(dec, "non-finite loss")
        hist = s.loss_g_history
        median = statistics.median(hist) if len(hist) >= 3 else None
        spike = diag.get("loss_g_max", diag["loss_g"])     # the worst step of the interval
        dominating = (median is not None and diag["d_real"] > self.c.dominance_d_real
                      and diag["d_fake"] < self.c.dominance_d_fake
                      and spike > self.c.dominance_loss_ratio * max(median, 1e-8))
        s.dominance_streak = s.dominance_streak + 1 if dominating else 0
        if not dominating:              # the median is of healthy intervals, so a long spike cannot hide itself
            hist.append(diag["loss_g"])
            del hist[:-HISTORY]
        if self.c.dominance_window and s.dominance_streak == self.c.dominance_window:   # once an episode
            dec.events.append(("collapse_signal",
                               f"D dominates for {s.dominance_streak} intervals: D(x) {diag['d_real']:.3f}, "
                               f"D(G(z)) {diag['d_fake']:.3f}, loss_g up to {spike:.3g} vs recent median "
                               f"{median:.3g}", {"signal": "d_dominance"}))
            return self._collapse(dec, "discriminator dominance with a loss_g spike")
        return dec

    # ---- collapse
    def _collapse(self, dec: Decision, why: str) -> Decision:
        action = self.c.on_collapse
        if action == "ignore":
            return dec
        if action == "stop":
            dec.stop = f"collapse: {why}"
        elif self.s.best is None:
            dec.stop = f"collapse before any best checkpoint: {why}"
        elif self.s.rollbacks >= self.c.max_rollbacks:
            dec.stop = f"collapse after {self.s.rollbacks} rollbacks (max_rollbacks): {why}"
        else:
            dec.rollback = why
        if dec.stop:
            dec.events.append(("early_stop", dec.stop, {}))
        return dec

    def rolled_back(self):
        """The loop restored `best`: count it and start the signals afresh."""
        s = self.s
        s.rollbacks += 1
        s.dominance_streak = s.bad_streak = 0
        s.loss_g_history.clear()

    # ---- state
    def state_dict(self) -> dict:
        return asdict(self.s)

    def load_state_dict(self, d: dict):
        self.s = SelectorState(**d)
