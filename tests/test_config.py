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


def test_extends_merges_over_the_parent_file(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 5\nname: base\nopt:\n  lr: 3\n  kind: sgd\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    child = sub / "child.yaml"
    child.write_text("extends: ../base.yaml\nname: child\nopt:\n  lr: 0.5\n")
    cfg = load_config(Cfg, child, ["steps=7"])
    # the child's keys win, mappings merge key by key, overrides come last
    assert cfg == Cfg(steps=7, name="child", opt=Opt(lr=0.5, kind="sgd"))
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text("extends: sub/child.yaml\nsteps: 9\n")
    assert load_config(Cfg, grandchild) == Cfg(steps=9, name="child", opt=Opt(lr=0.5, kind="sgd"))


@pytest.mark.parametrize(
    "files, message",
    [
        ({"c.yaml": "steps: 2\nextends: nope.yaml\n"}, r"c.yaml:2: extends: 'nope.yaml' not found"),
        ({"c.yaml": "extends: [a.yaml]\n"}, r"c.yaml:1: extends: expected the path of a YAML config"),
        ({"c.yaml": "extends: c.yaml\n"}, r"c.yaml:1: extends: 'c.yaml' extends this file again"),
        ({"c.yaml": "extends: b.yaml\n", "b.yaml": "extends: c.yaml\n"}, r"b.yaml:1: extends: 'c.yaml' extends"),
        # an error in the parent names the parent's file and line
        ({"c.yaml": "extends: b.yaml\nsteps: 3\n", "b.yaml": "name: b\nopt:\n  lrr: 1\n"},
         r"b.yaml:3: unknown config key 'opt.lrr'"),
        ({"c.yaml": "extends: b.yaml\nsteps: many\n", "b.yaml": "name: b\n"},
         r"c.yaml:2: steps: expected an integer"),
    ],
)
def test_bad_extends_is_one_line_naming_file_and_line(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(Cfg, tmp_path / "c.yaml")
    assert "\n" not in str(info.value)
