import re
import subprocess
import sys
from pathlib import Path

import pytest

from ganlab import config
from ganlab.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_shipped_experiments_load():
    for p in sorted((ROOT / "experiments").glob("*.yaml")):
        cfg = config.load(p)
        assert cfg.name


def test_seed_baseline_is_the_seed_recipe():
    c = config.load(ROOT / "experiments" / "seed_baseline.yaml")
    assert (c.model.nz, c.model.g_width, c.model.d_width, c.data.image_size) == (100, 64, 64, 64)
    assert (c.train.loss, c.train.lr_g, c.train.lr_d, c.train.beta1, c.train.beta2) == ("bce", 2e-4, 2e-4, 0.5, 0.999)
    assert c.model.init == "normal" and not c.model.spectral_norm and c.model.d_norm == "batch"
    assert c.train.batch_size == 64 and c.train.label_smoothing == 0 and c.train.instance_noise == 0
    assert c.train.ema_halflife == 0 and c.train.clip_norm_d == 0 and not c.train.diffaug


def test_extends_and_set(tmp_path):
    write(tmp_path / "base.yaml", "name: base\ntrain: {steps: 10, batch_size: 32}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nname: child\ntrain: {steps: 20}\n")
    c = config.load(child, ["train.lr_g=0.001", "model.spectral_norm=true", "train.diffaug=translation,cutout"])
    assert (c.name, c.train.steps, c.train.batch_size, c.train.lr_g) == ("child", 20, 32, 0.001)
    assert c.model.spectral_norm is True and c.train.diffaug == ["translation", "cutout"]


@pytest.mark.parametrize(
    "text,overrides,needle",
    [
        ("trian: {steps: 1}\n", [], "unknown key 'trian' (did you mean 'train'?)"),
        ("train: {stesp: 1}\n", [], "unknown key 'train.stesp' (did you mean 'train.steps'?)"),
        ("train: {steps: ten}\n", [], "key 'train.steps' must be an integer, got 'ten'"),
        ("train: {steps: 0}\n", [], "key 'train.steps' must be >= 1"),
        ("train: {loss: hinje}\n", [], "must be one of bce, hinge, lsgan, wgan-gp; got 'hinje' (did you mean hinge?)"),
        ("data: {image_size: 48}\n", [], "key 'data.image_size' must be one of 32, 64, 128"),
        ("data: {root: /no/such/folder}\n", [], "key 'data.root' is '/no/such/folder', which is not a folder"),
        ("- a\n- b\n", [], "must be a YAML mapping of sections, got a list"),
        ("train: 3\n", [], "'train' must be a section"),
        ("name: x\n", ["train.batch_size=big"], "key 'train.batch_size' must be an integer, got 'big'"),
        ("name: x\n", ["model.spectral_norm=maybe"], "must be true or false"),
        ("name: x\n", ["train.lr_g"], "expected KEY=VALUE"),
        ("train: {lr_g: .nan}\n", [], "must be a finite number"),
        ("extends: nowhere.yaml\n", [], "no such experiment file"),
        ("a: [\n", [], "is not valid YAML"),
        ("eval: {feature_extractor: domian}\n", [], "key 'eval.feature_extractor' is 'domian' (did you mean domain?)"),
        ("eval: {feature_extractor: /no/such/net.pt}\n", [], "or a TorchScript file that exists"),
        ("eval: {seed: 5, handover_seed: 4}\n", [], "key 'eval.handover_seed' 4 draws latent seeds [5]"),
    ],
)
def test_bad_configs_name_file_key_and_allowed(tmp_path, text, overrides, needle):
    p = write(tmp_path / "exp.yaml", text)
    with pytest.raises(ConfigError) as e:
        config.load(p, overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    if not overrides:
        assert "exp.yaml" in msg or "nowhere.yaml" in msg


def test_bad_config_is_one_line_on_the_command_line(tmp_path):
    p = write(tmp_path / "exp.yaml", "train: {batch_sise: 3}\n")
    r = subprocess.run([sys.executable, "-m", "ganlab.cli", "train", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "did you mean 'train.batch_size'" in r.stderr
    assert "Traceback" not in r.stderr


def test_flatten_is_stable_and_schema_covers_every_key():
    flat = config.flatten(config.Config())
    assert flat["train.batch_size"] == 64 and flat["eval.metrics"] == "fid,isc,kid"
    keys = {r[0] for r in config.schema_rows()}
    assert set(flat) == keys


def test_yaml_round_trip():
    c = config.load(None, ["train.steps=7", "train.diffaug=[color]"])
    again = config.from_dict(__import__("yaml").safe_load(config.to_yaml(c)))
    assert again == c


def test_the_schema_table_in_docs_is_current():
    doc = (ROOT / "docs" / "config.md").read_text()
    for key, default, allowed, meaning in config.schema_rows():
        assert f"| `{key}` | `{default}` | {allowed} | {meaning} |" in doc, (
            f"docs/config.md's schema table is stale for {key}"
        )


def test_the_readme_is_the_front_door():
    """About 200 lines, with the install line and the test command that .ci/run runs."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(readme.splitlines()) <= 220
    assert 'pip install -c constraints.txt -e ".[dev]"' in readme and 'pip install -c constraints.txt -e ".[dev]"' in ci
    assert "pytest -q" in readme and "pytest -q" in ci
    for doc in re.findall(r"docs/[a-z_]+\.md", readme):
        assert (ROOT / doc).exists(), doc


def test_stabilizers_sweep_variants_all_load():
    from ganlab import sweep

    base, name, variants = sweep.load_sweep(ROOT / "experiments" / "sweeps" / "stabilizers.yaml")
    assert len(variants) == 8 and name == "stabilizers"
    for label, exp, ov in variants:
        c = config.load(exp, ov + [f"variant={label}"])
        assert c.name == "stabilizers" and c.selection.on_collapse == "ignore"
    assert variants[-1][1].name == "recommended.yaml"


def test_every_shipped_sweep_and_experiment_loads():
    from ganlab import sweep

    for f in (ROOT / "experiments" / "sweeps").glob("*.yaml"):
        for label, exp, ov in sweep.load_sweep(f)[2]:
            config.load(exp, ov + [f"variant={label}"])
    for f in (ROOT / "experiments").glob("*.yaml"):
        config.load(f)


@pytest.mark.parametrize(
    "text,value",
    [("1e-4", 1e-4), ("1E-4", 1e-4), ("2.5e+3", 2500.0), (".5", 0.5), ("2.5e3", 2500.0), ("3e-2", 0.03), ("+1e0", 1.0)],
)
def test_every_float_form_parses_in_set_and_in_files(tmp_path, text, value):
    assert config.load(None, [f"train.lr_d={text}"]).train.lr_d == value
    p = tmp_path / "e.yaml"
    p.write_text(f"train: {{lr_g: {text}}}\n")
    assert config.load(p).train.lr_g == value


def test_strings_that_only_look_numeric_stay_strings():
    assert config.load(None, ["name=1e4run", "variant=e5"]).name == "1e4run"
