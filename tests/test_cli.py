"""The generate command (the first thing a new user tries) and one-line errors with exit code 2."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxforget.cli import main
from tiny_pipelines import build_sd_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return build_sd_folder(tmp_path_factory.mktemp("cli") / "sd1", kind="sd1", seed=3)


def test_generate_writes_a_grid(sd1_folder, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main([
        "a red circle", "a blue star", "--model", str(sd1_folder), "--num-images", "3",
        "--steps", "2", "--out", str(out), "--scale", "2",
    ], command="generate")
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    img = np.asarray(Image.open(out))
    # 2 rows x 3 columns of 16x16 images upscaled 2x, with padding and a label column
    assert img.shape[0] == 2 * (32 + 2) + 2
    assert img.shape[1] > 3 * (32 + 2)
    assert img.std() > 0  # not a blank canvas


def test_generate_bad_model_folder_is_one_line_exit_2(tmp_path, capsys):
    code = main(["a star", "--model", str(tmp_path / "missing")], command="generate")
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "missing" in err and "model folder does not exist" in err


def test_launch_script_exit_code_in_a_subprocess(tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "generate.py"), "x", "--model", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown pipeline class 'KandinskyPipeline'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unlearn_without_config_uses_the_toyworld_dfr_config(tmp_path):
    # the main command with no --config and no model runs the tuned toy-world configuration;
    # naming a model (flag or override) keeps RunConfig's own defaults
    from jaxforget.cli import TOYWORLD_DFR_CONFIG, load_run_config, run_config_path
    from jaxforget.config import load_config
    from jaxforget.engine import RunConfig

    assert TOYWORLD_DFR_CONFIG.is_file()
    tuned = load_config(RunConfig, TOYWORLD_DFR_CONFIG)
    cfg = load_run_config(None, ["steps=7"], run_dir=str(tmp_path / "run"))
    assert cfg.steps == 7 and cfg.run_dir == str(tmp_path / "run")
    assert cfg.dfr == tuned.dfr and cfg.optim == tuned.optim and cfg.data == tuned.data
    assert cfg.dfr != RunConfig().dfr  # the test means something: the YAML differs from the defaults
    assert run_config_path(None, [], model="some/folder") is None
    assert run_config_path(None, ["model=some/folder"]) is None
    assert run_config_path("mine.yaml", []) == "mine.yaml"
    assert load_run_config(None, [], model=str(tmp_path)).dfr == RunConfig().dfr
