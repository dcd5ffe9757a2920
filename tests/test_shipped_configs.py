"""The YAML configs and request files shipped in configs/: every one loads and validates, the
derived ones say what they derive, and the Stable Diffusion configs drive a real run on tiny
random SD 1.x and SDXL pipelines (the configs' own settings, shrunk in size by overrides)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from jaxforget.cli import main
from jaxforget.config import load_config, to_dict
from jaxforget.engine import RunConfig
from jaxforget.requests import parse_requests
from jaxforget.toyworld.pretrain import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (REPO / "configs").glob("*/*.yaml") if p.name != "pretrain.yaml")
REQUEST_FILES = sorted((REPO / "configs").glob("*/*.txt"))

# the shipped settings, at the size of a tiny test pipeline
TINY = ["steps=2", "batch_size=8", "checkpoint_every=1", "data.forget_images=8", "data.retain_images=8",
        "data.prior_images=8", "data.removed_images=8", "data.num_inference_steps=2", "data.gen_batch_size=8",
        "regularizer.ewc_samples=4"]


def test_there_are_configs_for_every_model_family():
    names = {p.relative_to(REPO / "configs").as_posix() for p in RUN_CONFIGS}
    for family in ("toyworld", "sd15", "sd21", "sdxl"):
        assert {f"{family}/dfr.yaml", f"{family}/duge.yaml"} <= names, names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_run_config_loads(path):
    cfg = load_config(RunConfig, path)
    assert cfg.method in path.stem  # dfr.yaml trains dfr, duge_short.yaml duge, ...
    assert cfg.run_dir.startswith("runs/")


def test_pretrain_config_loads():
    assert load_config(PretrainConfig, REPO / "configs" / "toyworld" / "pretrain.yaml")


@pytest.mark.parametrize("path", REQUEST_FILES, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_request_file_parses(path):
    requests = parse_requests(path)
    assert requests and len({r.target for r in requests}) == len(requests)


def test_duge_short_is_duge_with_the_three_k3_overrides():
    # configs/toyworld/duge_short.yaml is exactly the setting measured at k = 3 (NOTES.md)
    short = to_dict(load_config(RunConfig, REPO / "configs" / "toyworld" / "duge_short.yaml"))
    ref = to_dict(load_config(RunConfig, REPO / "configs" / "toyworld" / "duge.yaml",
                              ["optim.lr=1e-3", "regularizer.weight=0.3", "duge.gamma=3"]))
    assert short.pop("run_dir") != ref.pop("run_dir")
    assert short == ref


@pytest.mark.slow
@pytest.mark.parametrize("kind, config", [("sd1", "sd15/dfr.yaml"), ("sdxl", "sdxl/duge.yaml")])
def test_sd_config_runs_a_request_on_a_tiny_pipeline(kind, config, tmp_path):
    from tiny_pipelines import build_sd_folder

    model = build_sd_folder(tmp_path / kind, kind)
    requests = tmp_path / "requests.txt"
    first = next(line for line in (REPO / "configs" / "sd15" / "requests.txt").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    requests.write_text(first + "\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["--concepts", str(requests), "--config", str(REPO / "configs" / config), "--model", str(model),
                   "--run-dir", str(tmp_path / "run"), *TINY], command="unlearn")
    assert rc == 0, out.getvalue()
    assert "request 1 'van gogh' -> 'an artist': snapshot 1" in out.getvalue(), out.getvalue()
