"""Typed YAML configs with key=value overrides: every bad key/value is a one-line ConfigError."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from jaxforget.config import load_config, save_config, to_dict
from jaxforget.errors import ConfigError


@dataclass
class Opt:
    lr: float = 1e-4
    kind: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Cfg:
    steps: int = 10
    name: str = "run"
    opt: Opt = field(default_factory=Opt)
    mesh: dict[str, int] = field(default_factory=lambda: {"data": -1})
    layers: tuple[int, ...] = (1, 2)


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_file_and_overrides_merge(tmp_path):
    p = write(tmp_path, "steps: 5\nopt:\n  lr: 3\nlayers: [4, 5, 6]\n")
    cfg = load_config(Cfg, p, ["opt.kind=sgd", "mesh.fsdp=2", "name=x"])
    assert cfg == Cfg(steps=5, name="x", opt=Opt(lr=3.0, kind="sgd"), mesh={"data": -1, "fsdp": 2}, layers=(4, 5, 6))
    assert isinstance(cfg.opt.lr, float)
    out = tmp_path / "saved.yaml"
    save_config(cfg, out)
    assert load_config(Cfg, out) == cfg
    assert to_dict(cfg)["opt"] == {"lr": 3.0, "kind": "sgd"}


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("steps: 5\nopt:\n  lr: 3\n  kindd: sgd\n", [], r"c.yaml:4: unknown config key 'opt.kindd'"),
        ("steps: five\n", [], r"c.yaml:1: steps: expected an integer, got 'five'"),
        ("opt:\n  kind: adam\n", [], r"c.yaml:2: opt.kind: must be one of 'adamw', 'sgd'"),
        ("steps: [1\n", [], r"c.yaml:2: invalid YAML"),
        ("- 1\n", [], r"top level must be a mapping"),
        ("", ["opt.lr=abc"], r"command line: opt.lr: expected a number, got 'abc'"),
        ("", ["stepz=3"], r"command line: unknown config key 'stepz'"),
        ("", ["steps"], r"command line: override 'steps' must look like key=value"),
        ("", ["steps=true"], r"steps: expected an integer, got True"),
    ],
)
def test_bad_configs_name_file_line_and_field(tmp_path, text, overrides, message):
    p = write(tmp_path, text) if text else None
    with pytest.raises(ConfigError, match=message) as info:
        load_config(Cfg, p, overrides)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
