"""`ganlab train | sample | eval | best | sweep | tune | report | features | bench`: parse, call, print.

User mistakes (bad config, unusable data, missing weights, damaged checkpoints) end with one line
on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import config as config_mod


def main(argv=None):
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "true")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("ganlab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, config_mod.UserError):
            print(f"ganlab: error: {e}", file=sys.stderr)
            return 2
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ganlab", description="Train, evaluate, compare and pick RGBA GANs.")
    sub = p.add_subparsers(dest="cmd")

    t = sub.add_parser(
        "train",
        help="train from a YAML experiment",
        description="Train the experiment. The run folder (printed at start and end) holds the "
        "resolved config, last/best checkpoints, generator.pt and events.jsonl.",
    )
    t.add_argument("experiment", nargs="?", help="experiment YAML (not needed with --resume)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.batch_size=128 (repeatable)",
    )
    t.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last good checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar; only decisions are printed")
    t.add_argument(
        "--new-period",
        action="store_true",
        help="with --resume: accept a changed evaluation protocol as a new selection period "
        "(best and patience start again) instead of refusing",
    )
    t.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="end this call after global step STEP (last.pt saved); --resume continues it",
    )
    t.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="one run on N processes of this machine (torchrun, DistributedDataParallel): one GPU "
        "each, or CPU processes with gloo; train.batch_size is the global batch",
    )
    t.set_defaults(func=cmd_train)

    _generator_commands(sub)
    _run_commands(sub)
    return p


def _generator_commands(sub):
    """sample, eval, best: what reads a generator or the tracking store."""
    s = sub.add_parser(
        "sample",
        help="write PNGs from a generator",
        description="SOURCE: a checkpoint (.pt), a run folder, a run id, 'best' (the best run of the "
        "latest experiment) or models:/NAME@champion. Writes straight-alpha RGBA PNGs and "
        "grid.png over a checkerboard.",
    )
    s.add_argument("source")
    s.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    s.add_argument("--out", default="samples", help="output folder (default ./samples)")
    s.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    s.add_argument("--experiment", help="with SOURCE=best: which experiment")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint or run with the experiment's protocol",
        description="Computes the metrics of SOURCE's generator against its held-out set, with its "
        "run's evaluation protocol (or the --set overrides).",
    )
    e.add_argument("source")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to generate and extract features (default auto: CUDA when present)",
    )
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "best",
        help="rank runs by the hand-over score of the generator each hands over",
        description="Ranks the finished runs of an experiment by handover_<metric> (the generator.pt "
        "each run hands over, scored on fresh latents over several draws, with its "
        "standard error), among runs that share one hand-over signature (the newest "
        "run's, unless --signature); names the other signatures and their run counts.",
    )
    b.add_argument("--experiment", help="experiment name (default: the most recently active)")
    b.add_argument("--metric", default=None, help="metric (default: the runs' selection.metric)")
    b.add_argument("--top", type=int, default=5)
    b.add_argument("--signature", help="evaluation signature to rank within")
    b.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_best)


def _run_commands(sub):
    """sweep, tune, report, features, bench: what runs or reads several runs, and the domain encoder."""
    w = sub.add_parser(
        "sweep",
        help="run a base experiment with a list or grid of overrides",
        description="SWEEP.yaml: {base: EXPERIMENT.yaml, name?: str, variants: {label: {key: value}}} "
        "or grid: {key: [values]}. One parent MLflow run, a child per variant.",
    )
    w.add_argument("sweep")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every variant")
    w.add_argument("--quiet", action="store_true")
    w.add_argument("--only", action="append", default=[], help="run only these variants")
    _worker_flags(w)
    w.set_defaults(func=cmd_sweep)

    t = sub.add_parser(
        "tune",
        help="hyperparameter search on Optuna: each trial an ordinary run",
        description="STUDY.yaml: {base, name?, set?, space: {key: [choices] | {low, high, log?, step?}}, "
        "sampler: tpe|random|grid, pruner: median|hyperband|none, trials, seed, storage (RDB "
        "URL; default sqlite under tracking.runs_dir), heartbeat}. Run the same command on "
        "another machine (same storage and tracking server) to add workers.",
    )
    t.add_argument("study")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every trial")
    t.add_argument("--quiet", action="store_true")
    t.add_argument(
        "--timeout",
        type=int,
        default=None,
        metavar="SECONDS",
        help="workers start no new trial after this long (overrides the study's timeout)",
    )
    _worker_flags(t)
    t.set_defaults(func=cmd_tune)

    r = sub.add_parser(
        "report",
        help="an HTML page of one run, or one comparing several",
        description="RUN: run folders. One run: curves, metric, sample grids, config diff. "
        "Several: their metric curves overlaid and each best grid.",
    )
    r.add_argument("runs", nargs="+")
    r.add_argument("--out", help="output folder (default RUN/report, or ./report for several runs)")
    r.set_defaults(func=cmd_report)

    f = sub.add_parser(
        "features",
        help="train (or find cached) the domain encoder for an experiment's data",
        description="Trains a compact encoder (SimCLR, plus class labels when the folder has "
        "several classes) on the training split only, and writes a TorchScript file "
        "for eval.feature_extractor, named by its content hash, with a JSON card. "
        "eval.feature_extractor: auto does the same on first use when there are no "
        "InceptionV3 weights; the recipe is eval.encoder_steps / eval.encoder_batch_size.",
    )
    f.add_argument("experiment")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    f.add_argument(
        "--register",
        action="store_true",
        help="use the team's encoder from the tracking store, publishing this one when nobody has, even with "
        "tracking.enabled false (with tracking on, this happens anyway)",
    )
    f.set_defaults(func=cmd_features)

    n = sub.add_parser(
        "bench",
        help="benchmark ganlab against the seed loop",
        description="Training speed of the seed loop, ganlab's seed_baseline and recommended configs, "
        "evaluation and tracking cost, measured side by side in one process.",
    )
    n.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    n.add_argument("--json", metavar="FILE", help="write the results as JSON")
    n.add_argument("--data", default="builtin:sprites", help="image folder (default: built-in sprites)")
    n.add_argument("--steps", type=int, default=0, help="timed steps per contender and round (default: by device)")
    n.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is reported)")
    n.add_argument(
        "--skip",
        action="append",
        default=[],
        help="skip a contender (seed, a key of bench.CONTENDERS: "
        "baseline, baseline-bf16, recommended-ref, recommended, recommended-bf16-ref, recommended-bf16, "
        "r1-color-bf16) or a part (eval, tracking)",
    )
    n.set_defaults(func=cmd_bench)


# ----------------------------------------------------------------------------------------- commands


def cmd_train(args):
    from . import train

    if args.nproc < 1:
        raise config_mod.ConfigError(f"--nproc {args.nproc}: expected a number of processes >= 1")
    cfg = _train_config(args)  # checked here: a mistake is one line, not one per process
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from . import distributed

        distributed.check_split(cfg.train.batch_size, args.nproc, cfg.model.pack, cfg.model.mbstd_group)
        return _launch_train(args)
    if args.resume:
        res = train.train(
            cfg,
            run_dir=Path(args.resume),
            resume=True,
            quiet=args.quiet,
            new_period=args.new_period,
            stop_at=args.stop_at,
        )
    else:
        res = train.train(cfg, quiet=args.quiet, experiment_file=args.experiment, stop_at=args.stop_at)
    if int(os.environ.get("RANK", "0")):
        return 0  # rank 0 reports for the run
    print(f"run folder: {res.run_dir}")
    m = cfg.selection.metric
    score, se = res.score(m)
    print(
        f"stopped: {res.stopped} at step {res.step}; selection best {m} = "
        f"{'n/a' if res.best is None else format(res.best, '.4g')} at step {res.best_step}; rollbacks {res.rollbacks}"
    )
    if score is not None:
        print(
            f"handed over: step {res.handed_over_step}, hand-over {m} = {score:.4g} +/- {se:.2g} "
            f"(signature {res.handover_signature})"
        )
    return 0


def _train_config(args):
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").exists():
            raise config_mod.ConfigError(f"--resume {run}: not a run folder (no config.yaml)")
        return config_mod.load(run / "config.yaml", args.set)
    if not args.experiment:
        raise config_mod.ConfigError("train: give an EXPERIMENT.yaml (or --resume RUN)")
    return config_mod.load(args.experiment, args.set)


def _launch_train(args):
    """--nproc N: the same command under torchrun, with N processes on this machine."""
    from . import distributed

    argv, skip = [], False
    for a in args.argv:  # the command as typed, less --nproc
        if skip or a == "--nproc" or a.startswith("--nproc="):
            skip = a == "--nproc"
            continue
        argv.append(a)
    return distributed.launch(args.nproc, argv)


def cmd_sample(args):
    from . import sources

    path = sources.write_samples(args.source, args.n, Path(args.out), args.seed, experiment=args.experiment)
    print(f"wrote {args.n} PNGs and grid.png to {path}")


def cmd_eval(args):
    from . import sources

    res = sources.evaluate_source(args.source, args.set, device=args.device)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res["metrics"].items():
            print(f"{k:>14}: {v:.6g}")
        print(f"{'extractor':>14}: {res['extractor']}  signature {res['signature']}  step {res['step']}")


def cmd_best(args):
    from . import sources

    res = sources.rank_runs(
        experiment=args.experiment, metric=args.metric, top=args.top, signature=args.signature, uri=args.uri
    )
    print(json.dumps(res, indent=2) if args.json else sources.format_ranking(res))


def _worker_flags(p):
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--devices", default="", help="GPUs for the workers, e.g. 0,1 (one each; CUDA_VISIBLE_DEVICES)")
    p.add_argument(
        "--per-device",
        type=int,
        default=1,
        metavar="N",
        help="N workers on each GPU (--devices, or every visible GPU): small runs leave a card idle",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a spawned worker
    p.add_argument("--name", default="", help=argparse.SUPPRESS)  # its study
    p.add_argument("--storage", default="", help=argparse.SUPPRESS)


def cmd_sweep(args):
    from . import sweep, tune

    if args.worker:
        spec, _, _, _ = sweep.sweep_spec(args.sweep, args.set, args.only, name=args.name, storage=args.storage)
        tune.work(spec, args.set, quiet=True)
        return
    workers, devices = tune.worker_slots(args.workers, args.devices, args.per_device)
    sweep.run_sweep(args.sweep, args.set, quiet=args.quiet, only=args.only, workers=workers, devices=devices)


def cmd_tune(args):
    from . import tune

    spec = tune.load_spec(args.study)
    if args.timeout is not None:
        spec.timeout = args.timeout
    if args.worker:
        spec.name, spec.storage = args.name or spec.name, args.storage or spec.storage
        tune.work(spec, args.set, quiet=True)
        return
    workers, devices = tune.worker_slots(args.workers, args.devices, args.per_device)
    rows = tune.run_study(
        spec,
        workers=workers,
        devices=devices,
        extra_sets=args.set,
        quiet=args.quiet,
        worker_args=["--timeout", str(spec.timeout)],
    )
    return 0 if any(r["state"] == "COMPLETE" for r in rows) else 1


def cmd_report(args):
    from . import report

    page = report.write_report([Path(r) for r in args.runs], Path(args.out) if args.out else None)
    print(f"report: {page}")


def cmd_features(args):
    from . import data, track
    from .device import pick_device
    from .eval import encoder

    # --register: the team's encoder, as a run with tracking on would get it (this machine's published
    # when nobody has claimed one), and the local cache then names the team's, not this machine's own
    cfg = config_mod.load(args.experiment, args.set + (["tracking.enabled=true"] if args.register else []))
    images = data.load_images(cfg.data, cfg.seed)
    path, card = encoder.ensure(cfg, device=pick_device(cfg.train.device), images=images)
    print(f"encoder: {path}  (trained in {card['train_seconds']} s on {card['device']}; card beside it)")
    if cfg.tracking.enabled:
        from .eval.encoder_store import claim_name

        print(
            f"the team's encoder for this data and recipe, in {track.tracking_uri(cfg)} "
            f"(registered model {claim_name(encoder.cache_key(images, encoder.recipe(cfg)), 1)})"
        )


def cmd_bench(args):
    from . import bench

    bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
