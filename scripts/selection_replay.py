"""Replay ganlab's selection rules on published training curves (PyTorch-StudioGAN's logs, parsed into
docs/data/studiogan_fid.json) and report, per run and in total, what each rule hands over and saves.

    python scripts/selection_replay.py                       # prints the markdown for docs/selection.md
    python scripts/selection_replay.py --tune CIFAR10        # tune on these datasets, report on the rest

Per run: regret (the handed-over FID over the curve's best, minus 1), the share of evaluations the
rule needed (early stopping saves the rest), and collapse signals: lead time on runs that blow up
late (evaluations between the signal and the blow-up, ganlab.replay.blows_up_late), false alarms on
runs that improve to the end (caught: a signal at most CAUGHT_WITHIN evaluations after the blow-up
starts; lead: evaluations from the signal to the blow-up, negative when after). The rules are tuned on --tune's runs: among the rules whose mean regret
is at most 1% and worst regret at most 5%, with no false alarm, the one that catches most blow-ups,
then the one that needs the fewest evaluations.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from ganlab import replay

ROOT = Path(__file__).resolve().parent.parent
GRID = {
    "patience": [0, 5, 10, 20, 40],
    "noise_rel": [0.0, 0.005, 0.01, 0.02],
    "collapse_factor": [1.5, 2.0, 3.0],
    "collapse_evals": [1, 2, 3],
}
CAUGHT_WITHIN = 3  # a blow-up is caught by a signal at most this many evaluations after it starts
CURRENT = {"patience": 0, "noise_rel": 0.0, "collapse_factor": 2.0, "collapse_evals": 2}  # the defaults before


def run_rule(runs: list[dict], rule: dict) -> list[dict]:
    out = []
    for r in runs:
        o = replay.replay(
            r["fid"],
            replay.selector(rule["patience"], rule["collapse_factor"], rule["collapse_evals"]),
            rule["noise_rel"],
        )
        boom = replay.blows_up_late(r["fid"])
        out.append(
            {
                "run": f"{r['dataset']}/{r['name']}",
                "evals": len(r["fid"]),
                "regret": o.regret,
                "used": o.used,
                "alarm": o.alarm,
                "boom": boom,
                "improver": replay.improves_to_the_end(r["fid"]),
                "lead": None if boom is None or o.alarm is None else boom - o.alarm,
            }
        )
    return out


def totals(rows: list[dict]) -> dict:
    booms = [r for r in rows if r["boom"] is not None]
    return {
        "mean_regret": statistics.fmean(r["regret"] for r in rows),
        "max_regret": max(r["regret"] for r in rows),
        "saved": 1 - statistics.fmean(r["used"] for r in rows),
        "caught": sum(r["lead"] is not None and r["lead"] >= -CAUGHT_WITHIN for r in booms),
        "booms": len(booms),
        "median_lead": statistics.median([r["lead"] for r in booms if r["lead"] is not None] or [float("nan")]),
        "false_alarms": sum(r["improver"] and r["alarm"] is not None for r in rows),
        "improvers": sum(r["improver"] for r in rows),
    }


def pick(runs: list[dict]) -> tuple[dict, dict]:
    best = None
    for values in itertools.product(*GRID.values()):
        rule = dict(zip(GRID, values))
        t = totals(run_rule(runs, rule))
        if t["mean_regret"] > 0.01 or t["max_regret"] > 0.05 or t["false_alarms"]:
            continue
        key = (-t["caught"], -t["saved"], rule["collapse_evals"], -rule["collapse_factor"])
        if best is None or key < best[0]:
            best = (key, rule, t)
    return best[1], best[2]


def fmt_rule(rule: dict) -> str:
    return (
        f"patience {rule['patience'] or 'off'}, min_delta {rule['noise_rel']:.1%} of the best, "
        f"collapse {rule['collapse_factor']}x for {rule['collapse_evals']} evaluations"
    )


def table(rows_by_rule: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| rule | runs | mean regret | worst regret | evaluations saved | blow-ups caught | median lead | false alarms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in rows_by_rule.items():
        t = totals(rows)
        lines.append(
            f"| {name} | {len(rows)} | {t['mean_regret']:.2%} | {t['max_regret']:.2%} | {t['saved']:.1%} | "
            f"{t['caught']} of {t['booms']} | {t['median_lead']:+g} | {t['false_alarms']} of {t['improvers']} improving to the end |"
        )
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "docs" / "data" / "studiogan_fid.json"))
    ap.add_argument("--tune", nargs="+", default=["CIFAR10"], help="datasets whose runs tune the rule")
    a = ap.parse_args()
    data = json.loads(Path(a.data).read_text())
    tune = [r for r in data["runs"] if r["dataset"] in a.tune]
    test = [r for r in data["runs"] if r["dataset"] not in a.tune]
    rule, _ = pick(tune)
    src = data["source"]
    out = [
        f"Curves: {len(data['runs'])} runs from {src['repository']} at {src['commit'][:10]} ({src['licence']}), "
        f"{sum(len(r['fid']) for r in data['runs'])} evaluations. Tuned on {', '.join(a.tune)} ({len(tune)} runs), "
        f"reported on the rest ({len(test)} runs).",
        "",
        f"Chosen rule: {fmt_rule(rule)}.",
        "",
    ]
    patience = {f"chosen, patience {p}": dict(rule, patience=p) for p in (10, 20) if p != rule["patience"]}
    for split, runs in (("tuning runs", tune), ("held-out runs", test)):
        rules = {f"before: {fmt_rule(CURRENT)}": CURRENT, f"chosen: {fmt_rule(rule)}": rule, **patience}
        out += [f"**{split}**", ""] + table({name: run_rule(runs, r) for name, r in rules.items()}) + [""]
    out += [
        "**held-out runs, one by one (chosen rule)**",
        "",
        "| run | evaluations | regret | used | signal at | blow-up at | lead |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in run_rule(test, rule):
        out.append(
            f"| {r['run']} | {r['evals']} | {r['regret']:.2%} | {r['used']:.0%} | {r['alarm'] if r['alarm'] is not None else '-'} | "
            f"{r['boom'] if r['boom'] is not None else '-'} | {r['lead'] if r['lead'] is not None else '-'} |"
        )
    print("\n".join(out))


if __name__ == "__main__":
    main()
