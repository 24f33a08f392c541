"""Sample grids of handed-over generators, made by script, never by hand (issue 35).

    python scripts/study_grids.py readme [RUN_DIR]          # docs/img/default_grid.png: the main job's hand-over
    python scripts/study_grids.py study docs/data/mainjob.jsonl --out docs/img/mainjob   # one strip per arm

`readme` without RUN_DIR trains `experiments/default.yaml` in a temporary folder first (about a minute on
a 2-core CPU with bf16), then draws 32 samples of its generator.pt on the fixed latents of `ganlab sample`
(seed 0) over a checkerboard, at twice their size, beside 32 real sprites drawn the same way
(docs/img/default_real.png): a reader judges the samples against the data, not against memory. `study`
reads a paired study's rows (their run_dir) and writes, for each arm, one image of its seeds side by side:
16 samples (4 x 4) of each seed's handed-over generator, the same latents for every arm, so a column
compares arms on one seed; and OUT_real.png, real sprites in the same layout.
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

from ganlab import data, sources  # noqa: E402
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
        protocol.save_grid(samples(run_dir, 32), out, nrow=16, scale=2)
        protocol.save_grid(real_sprites(32), out.with_name("default_real.png"), nrow=16, scale=2)
        print(f"wrote {out} from {run_dir}, and {out.with_name('default_real.png')}")


def real_sprites(n: int) -> torch.Tensor:
    """n built-in sprites at the main job's size (32), from a seed no run trains on (data.make_sprites);
    also the reference set of scripts/pixel_fd.py."""
    return data.make_sprites(n, 32, seed=987654)


def study(rows_path: Path, out_prefix: Path, per_seed: int = 16):
    rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()]
    side = int(per_seed**0.5)

    def strip(blocks: list[torch.Tensor], name: str):
        # one 4 x 4 block per seed, blocks side by side: save_grid lays out row by row, so interleave
        rows_of = [torch.cat([b[i * side : (i + 1) * side] for b in blocks]) for i in range(side)]
        path = out_prefix.with_name(f"{out_prefix.name}_{name}.png")
        protocol.save_grid(torch.cat(rows_of), path, nrow=side * len(blocks), scale=2)
        return path.name

    for arm in sorted({r["arm"] for r in rows}):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        name = strip([samples(Path(r["run_dir"]), per_seed) for r in mine], arm)
        print(f"{arm}: seeds {[r['seed'] for r in mine]} -> {name}")
    n_seeds = len({r["seed"] for r in rows})
    print(f"real sprites -> {strip(list(real_sprites(per_seed * n_seeds).split(per_seed)), 'real')}")


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
