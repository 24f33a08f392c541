"""Property-based tests: any input gives a valid result or the documented error."""

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ganlab import config, data
from ganlab.config import ConfigError
from ganlab.data import BadImage

KEYS = [k for k, *_ in config.schema_rows()] + ["train.nope", "bogus", "data", "eval.every.deeper"]
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.text(max_size=6), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_config_from_any_overrides(sets):
    overrides = [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in sets.items()
    ]
    try:
        cfg = config.load(None, overrides, check_paths=False)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert isinstance(cfg, config.Config)
    assert config.from_dict(yaml.safe_load(config.to_yaml(cfg))) == cfg


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_config_from_any_yaml_text(text):
    import os
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        config.load(f.name, check_paths=False)
    except ConfigError as e:
        assert "\n" not in str(e)
    finally:
        os.unlink(f.name)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_decoder_on_arbitrary_bytes(blob):
    try:
        out = data.decode_image(blob, 8)
    except BadImage:
        return
    assert out.shape == (8, 8, 4) and out.dtype == np.uint8


MODES = [
    "1",
    "L",
    "LA",
    "P",
    "RGB",
    "RGBA",
    "CMYK",
    "I",
    "I;16",
    "F",
    "YCbCr",
    "HSV",
    "LAB",
    "RGBX",
    "La",
    "RGBa",
    "PA",
]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(MODES),
    st.integers(1, 40),
    st.integers(1, 40),
    st.sampled_from([8, 32]),
    st.sampled_from(["pad", "crop"]),
    st.integers(0, 2**32 - 1),
)
def test_decoder_on_every_mode_and_shape(mode, w, h, size, fit, seed):
    rng = np.random.RandomState(seed % 2**32)
    img = Image.new(mode, (w, h))
    bands = len(img.getbands())
    if mode in ("I", "I;16", "F"):
        arr = rng.randint(0, 65535, (h, w)).astype({"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode])
        img = Image.fromarray(arr, mode) if mode != "I;16" else Image.fromarray(arr)
    else:
        img.frombytes(rng.randint(0, 256, w * h * bands, dtype=np.uint8).tobytes()[: len(img.tobytes())])
    try:
        out = data.fit_square(data.to_rgba(img), size, fit)
    except BadImage:
        return
    assert out.shape == (size, size, 4) and out.dtype == np.uint8
    if mode in ("L", "RGB", "CMYK", "I", "I;16", "F", "1", "YCbCr", "HSV", "LAB", "RGBX") and fit == "crop":
        assert (out[..., 3] == 255).all()  # opaque sources stay opaque
