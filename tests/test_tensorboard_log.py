"""The optional TensorBoard log (jaxforget.tensorboard_log): tags, steps, what is skipped, and the
one-line error without tensorboardX. A whole run writing it: test_benchmark.py
(test_runs_write_tensorboard_logs)."""

from __future__ import annotations

import io
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from jaxforget.errors import ConfigError
from jaxforget.tensorboard_log import TensorBoardLog


def read_events(logdir: Path) -> list[tuple]:
    """(tag, step, value) of every scalar and (tag, step, (width, height)) of every image in the event files."""
    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecord: length, its crc, payload, payload crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("image"):
                    out.append((v.tag, ev.step, Image.open(io.BytesIO(v.image.encoded_image_string)).size))
                else:
                    out.append((v.tag, ev.step, v.simple_value))
    return out


def test_scalars_and_grid_land_on_their_steps(tmp_path):
    grid = tmp_path / "grid.png"
    Image.fromarray(np.full((12, 20, 3), 200, np.uint8)).save(grid)
    tb = TensorBoardLog(tmp_path / "run")
    tb.train(10, {"loss": 0.5, "grad_norm": 2.0})
    tb.train(20, {"loss": 0.25, "grad_norm": math.nan})  # a non-finite value is skipped, not logged
    tb.request(1, {"UA": 1.0, "fid_ratio": math.nan, "target": "circle", "met": True, "grid": str(grid)}, grid)
    tb.close()
    events = read_events(tmp_path / "run" / "tensorboard")
    assert sorted(events, key=str) == sorted([
        ("train/loss", 10, 0.5), ("train/grad_norm", 10, 2.0), ("train/loss", 20, 0.25),
        ("eval/UA", 1, 1.0), ("eval/grid", 1, (20, 12))], key=str)


def test_missing_tensorboardx_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    with pytest.raises(ConfigError, match=r"tensorboard: true needs tensorboardX"):
        TensorBoardLog(tmp_path)
    assert not (tmp_path / "tensorboard").exists()


def test_nothing_is_written_before_the_first_value(tmp_path):
    TensorBoardLog(tmp_path).close()
    assert not (tmp_path / "tensorboard").exists()


def test_a_run_without_tensorboardx_exits_2_before_creating_its_directory(tmp_path, capsys, monkeypatch):
    from jaxforget.cli import main

    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    (tmp_path / "requests.txt").write_text("star\n")
    rc = main(["--concepts", str(tmp_path / "requests.txt"), "--run-dir", str(tmp_path / "run"), "steps=1",
               "eval.every=0", "tensorboard=true"], command="unlearn")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: tensorboard: true needs tensorboardX") and "\n" not in err, err
    assert not (tmp_path / "run").exists()
