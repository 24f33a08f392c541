"""Sample grids of handed-over generators, made by script, never by hand (issue 35).

    python scripts/study_grids.py readme [RUN_DIR]          # docs/img/default_grid.png: the main job's hand-over
    python scripts/study_grids.py study docs/data/mainjob.jsonl --out docs/img/mainjob   # one strip per arm

`readme` without RUN_DIR trains `experiments/default.yaml` in a temporary folder first (about a minute on
a 2-core CPU with bf16), then draws 64 samples of its generator.pt on the fixed latents of `ganlab sample`
(seed 0) over a checkerboard. `study` reads a paired study's rows (their run_dir) and writes, for each arm,
one image of its seeds side by side: 16 samples (4 x 4) of each seed's handed-over generator, the same
latents for every arm, so a column compares arms on one seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ganlab import sources  # noqa: E402
from ganlab.eval import protocol  # noqa: E402
from ganlab.generator import generate  # noqa: E402


def samples(run_dir: Path, n: int, seed: int = 0) -> torch.Tensor:
    """n straight-RGBA uint8 samples of the run's handed-over generator on fixed latents."""
    g, info = sources.resolve(str(Path(run_dir) / "generator.pt"), None)
    z = torch.randn(n, info["config"].model.nz, generator=torch.Generator().manual_seed(seed))
    return generate(g, z, info["config"].data.alpha, "cpu")


def readme(run_dir: Path | None):
    with tempfile.TemporaryDirectory() as tmp:
        if run_dir is None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ganlab.cli",
                    "train",
                    str(ROOT / "experiments" / "default.yaml"),
                    "--quiet",
                    "--set",
                    "tracking.register_model=false",
                ],
                cwd=tmp,
                check=True,
            )
            run_dir = next(Path(tmp).glob("mlruns/runs/default/*/generator.pt")).parent
        out = ROOT / "docs" / "img" / "default_grid.png"
        protocol.save_grid(samples(run_dir, 64), out)
        print(f"wrote {out} from {run_dir}")


def study(rows_path: Path, out_prefix: Path, per_seed: int = 16):
    rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()]
    for arm in sorted({r["arm"] for r in rows}):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        # one 4 x 4 block per seed, blocks side by side: save_grid lays out row by row, so interleave
        blocks = [samples(Path(r["run_dir"]), per_seed) for r in mine]
        side = int(per_seed**0.5)
        rows_of = [torch.cat([b[i * side : (i + 1) * side] for b in blocks]) for i in range(side)]
        protocol.save_grid(
            torch.cat(rows_of), out_prefix.with_name(f"{out_prefix.name}_{arm}.png"), nrow=side * len(blocks)
        )
        print(f"{arm}: seeds {[r['seed'] for r in mine]} -> {out_prefix.name}_{arm}.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("readme")
    r.add_argument("run_dir", nargs="?", type=Path)
    s = sub.add_parser("study")
    s.add_argument("rows", type=Path)
    s.add_argument("--out", type=Path, required=True, help="prefix: OUT_<arm>.png")
    a = ap.parse_args(argv)
    readme(a.run_dir) if a.cmd == "readme" else study(a.rows, a.out)


if __name__ == "__main__":
    main()
