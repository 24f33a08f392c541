"""The registered model as a service: an MLflow pyfunc that turns (count, seed) into RGBA images.

    mlflow models serve -m models:/NAME@champion --env-manager local -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
         -d '{"dataframe_records": [{"count": 4, "seed": 0, "format": "png"}]}'

Each input row asks for `count` images from latents seeded by `seed` (so a request is repeatable);
`format` is "png" (base64 PNG bytes, straight alpha) or "array" (H x W x 4 uint8 lists). The model
carries ganlab's code (code_paths) and generator.pt; its pip requirements are pinned to the
versions that produced it. Knows nothing about training.
"""

from __future__ import annotations

import base64
import io

import mlflow.pyfunc
import torch

MAX_COUNT = 1024  # one request never asks for more images than this


class GeneratorImages(mlflow.pyfunc.PythonModel):
    """count + seed (+ format) per row -> one record per image."""

    def load_context(self, context):
        from ganlab.generator import load_generator

        self.g, self.info = load_generator(context.artifacts["generator"])

    def predict(self, context, model_input, params=None):
        from ganlab.generator import generate

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        out = []
        for i, row in enumerate(rows):
            count, seed = int(row.get("count", 1)), int(row.get("seed", 0))
            fmt = str(row.get("format") or "png")
            if not 1 <= count <= MAX_COUNT or fmt not in ("png", "array"):
                raise ValueError(f"row {i}: count must be 1..{MAX_COUNT} and format png or array; got {count}, {fmt!r}")
            z = torch.randn(count, self.info["config"].model.nz, generator=torch.Generator().manual_seed(seed))
            images = generate(self.g, z, self.info["config"].data.alpha, "cpu")
            for j, im in enumerate(images):
                hwc = im.permute(1, 2, 0).numpy()
                out.append(
                    {
                        "request": i,
                        "index": j,
                        "seed": seed,
                        "png": _png_b64(hwc) if fmt == "png" else None,
                        "rgba": hwc.tolist() if fmt == "array" else None,
                    }
                )
        return out


def _png_b64(hwc) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(hwc, "RGBA").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("long", "count"), ColSpec("long", "seed"), ColSpec("string", "format", required=False)])
    )


def pinned_requirements() -> list[str]:
    """The packages ganlab's generator code imports, at the versions installed now."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "numpy", "pillow", "pyyaml", "safetensors", "mlflow")]
