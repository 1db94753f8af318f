"""Typed YAML configs with dotted overrides."""

import dataclasses
import os
import pathlib
import stat
from typing import Literal

import pytest

from mcckd_jax import config as cfg

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class Optim:
    learning_rate: float = 1e-4  # peak learning rate
    schedule: Literal["cosine", "linear"] = "cosine"  # decay after warmup


@dataclasses.dataclass(frozen=True)
class Lora:
    rank: int = 8  # adapter rank
    targets: tuple[str, ...] = ("q_proj",)  # adapted maps


@dataclasses.dataclass(frozen=True)
class Experiment:
    steps: int = 10  # optimizer steps
    output_dir: str = "runs/x"  # where checkpoints go
    mesh: tuple[int, int, int] = (-1, 1, 1)  # data, fsdp, tensor
    optim: Optim = Optim()  # optimizer
    lora: Lora | None = None  # adapters, or none

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


def test_yaml_and_overrides_fill_nested_typed_fields(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("steps: 5\noptim:\n  learning_rate: 3\nmesh: [2, 2, 2]\n")
    config = cfg.load(Experiment, path, ["optim.schedule=linear", "lora.rank=4", "optim.learning_rate=3e0",
                                         "lora.targets=[q_proj, v_proj]", "output_dir=/tmp/o"])
    assert config == Experiment(steps=5, output_dir="/tmp/o", mesh=(2, 2, 2),
                                optim=Optim(learning_rate=3.0, schedule="linear"),
                                lora=Lora(rank=4, targets=("q_proj", "v_proj")))
    assert isinstance(config.optim.learning_rate, float)


@pytest.mark.parametrize("overrides,message", [
    (["optim.learnin_rate=1"], r"unknown config key optim.learnin_rate; did you mean optim.learning_rate"),
    (["stepz=3"], r"unknown config key stepz; did you mean steps"),
    (["steps=three"], r"steps: expected int, got 'three'"),
    (["optim.schedule=step"], r"optim.schedule: expected one of \['cosine', 'linear'\]"),
    (["mesh=[1, 2]"], r"mesh: expected 3 items, got 2"),
    (["steps"], r"not of the form dotted.key=value"),
    (["steps=0"], r"steps must be >= 1"),
    (["steps.x=1"], r"steps is not a section"),
])
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(cfg.ConfigError, match=message) as error:
        cfg.load(Experiment, None, overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("override,message", [
    ("lora.targets=[q_proj", r"override 'lora.targets=\[q_proj': lora.targets: not valid YAML "
     r"at column 8: while parsing a flow sequence, expected ',' or '\]'"),
    ("output_dir=!!python/object:os.system ls", r"output_dir: not valid YAML at column 1: could "
     r"not determine a constructor for the tag 'tag:yaml.org,2002:python/object:os.system'"),
    ("optim.schedule='cosine", r"optim.schedule: not valid YAML .*unexpected end of stream"),
])
def test_overrides_that_are_not_yaml_name_the_override_and_key(override, message):
    with pytest.raises(cfg.ConfigError, match=message) as error:
        cfg.load(Experiment, None, [override])
    assert "\n" not in str(error.value)


def test_bad_files_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(cfg.ConfigError, match=r"bad.yaml: unknown config key optim.momentum"):
        cfg.load(Experiment, path)
    path.write_text("steps: [1\n")
    with pytest.raises(cfg.ConfigError, match=r"bad.yaml: not valid YAML"):
        cfg.load(Experiment, path)


@pytest.mark.parametrize("text,message", [
    ("steps: 3\nmesh: [1\n", r"bad.yaml: not valid YAML at line 3 column 1: while parsing a "
     r"flow sequence, expected ',' or '\]', but got '<stream end>'$"),
    ("steps: 3\noutput_dir: !!python/object/apply:os.system ['ls']\n",
     r"bad.yaml: not valid YAML at line 2 column 13: could not determine a constructor for the "
     r"tag 'tag:yaml.org,2002:python/object/apply:os.system'$"),
])
def test_invalid_yaml_files_give_the_position_on_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError, match=message) as error:
        cfg.load(Experiment, path)
    assert "\n" not in str(error.value)


def test_saved_config_loads_back_identically(tmp_path):
    config = cfg.load(Experiment, None, ["lora.rank=16", "optim.learning_rate=0.5"])
    cfg.save(config, tmp_path / "resolved.yaml")
    assert cfg.load(Experiment, tmp_path / "resolved.yaml") == config
    assert [p.name for p in tmp_path.iterdir()] == ["resolved.yaml"]


def test_saved_config_follows_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        cfg.save(cfg.load(Experiment, None), tmp_path / "runs" / "resolved.yaml")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "runs" / "resolved.yaml").stat().st_mode) == 0o640


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_gives_its_command(path):
    from mcckd_jax.train.config import TrainConfig

    config = cfg.load(TrainConfig, path)
    assert config.run.steps >= 1
    header = path.read_text().splitlines()[:8]
    assert header[0].startswith("# ")
    assert any(f"mcckd-train configs/{path.name}" in line for line in header)


def test_a_dev_eval_max_questions_below_one_is_a_one_line_error():
    from mcckd_jax.train.config import TrainConfig

    with pytest.raises(cfg.ConfigError) as error:
        cfg.load(TrainConfig, None, ["dev_eval.max_questions=-1"])
    assert "dev_eval.max_questions must be >= 1" in str(error.value)
    assert "\n" not in str(error.value)
