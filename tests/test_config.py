"""RunConfig: defaults, YAML + dotted overrides, and load-time errors that name the key and the fix."""

import dataclasses

import pytest
import yaml

from pretrain.config import ConfigError, RunConfig, describe, load_config
from tests.conftest import run_cli


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_validate_and_every_field_is_documented():
    RunConfig().validate()
    rows = describe()
    assert len(rows) > 50
    assert all(doc for _, _, doc in rows), [key for key, _, doc in rows if not doc]


def test_yaml_then_overrides_take_effect(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 7\noptim:\n  lr: 3e-4\n")
    cfg = load_config(path, ["train.max_steps=50", "optim.warmup_steps=10", "optim.lr=1e-3", "data.sources=[{path: a.jsonl}]"])
    assert cfg.train.max_steps == 50
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.sources[0].path == "a.jsonl" and cfg.data.sources[0].text_field == "text"


def test_float_written_without_dot_is_a_number(tmp_path):
    assert load_config(write(tmp_path, "optim:\n  lr: 3e-4\n")).optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("text, override, key, fragment", [
    ("train:\n  max_step: 3\n", None, "train.max_step", "Did you mean 'max_steps'"),
    ("trian:\n  max_steps: 3\n", None, "trian", "Did you mean 'train'"),
    (None, "optim.lrr=1", "optim.lrr", "Did you mean 'lr'"),
    (None, "data.batch_size=8", "data.batch_size", "Did you mean 'global_batch_size' or 'micro_batch_size'"),
    ("train:\n  max_steps: ten\n", None, "train.max_steps", "must be an integer"),
    (None, "logging.tensorboard=maybe", "logging.tensorboard", "true or false"),
    (None, "train.precision=fp8", "train.precision", "allowed: auto, fp32, bf16"),
    (None, "data.global_batch_size=10", "data.global_batch_size", "multiple of micro_batch_size"),
    (None, "model.num_heads=5", "model.num_heads", "not divisible"),
    (None, "optim.lr=-1", "optim.lr", "must lie in (0, 1]"),
    (None, "data.split=90,10", "data.split", "three weights"),
    (None, "data.blend=[{path: x, weight: 0}]", "data.blend[0].weight", "positive"),
])
def test_bad_config_names_the_key(tmp_path, text, override, key, fragment):
    path = write(tmp_path, text) if text else None
    with pytest.raises(ConfigError) as err:
        load_config(path, [override] if override else [])
    assert err.value.key == key
    assert fragment in str(err.value)


def test_cli_config_error_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "train:\n  max_step: 3\n")
    result = run_cli("train", str(path))
    assert result.returncode == 2
    assert "train.max_step" in result.stderr and "max_steps" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_prints_resolved_config(tmp_path):
    result = run_cli("config", "configs/quickstart.yaml", "train.max_steps=5")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["max_steps"] == 5
    assert set(resolved) == {f.name for f in dataclasses.fields(RunConfig)}


def test_cli_takes_overrides_before_and_after_the_options():
    from pretrain.cli import main

    assert main(["config", "configs/quickstart.yaml", "train.max_steps=5", "--get", "train.max_steps"]) == 0
    result = run_cli("config", "configs/quickstart.yaml", "--get", "train.max_steps", "train.max_steps=7",
                     "optim.lr=0.5")
    assert result.returncode == 0 and result.stdout.strip() == "7", result.stderr
    bad = run_cli("config", "configs/quickstart.yaml", "--get", "train.max_steps", "--no-such-option")
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-option" in bad.stderr


def test_every_shipped_config_loads():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        load_config(path)
