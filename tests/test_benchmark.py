"""The benchmark driver (jaxforget.eval.benchmark, launch/benchmark.py) and the standalone
``jaxforget evaluate --run-dir``.

- Table logic on hand-made rows: targets are checked against the base model's scores.
- End to end (slow: several compiles on a 2-core CPU): a 2-request, 2-method run with very few
  steps on the shipped toy-world model writes the table (.md/.csv, the expected columns), the
  curves, all rows and the attack table; a second invocation skips the finished methods; and
  ``jaxforget evaluate`` rebuilds a deleted report from the evaluation cache without generating
  a single image.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
from PIL import Image

from jaxforget.eval import benchmark as B
from jaxforget.eval.attack import AttackConfig
from jaxforget.eval.hook import grid_path
from test_tensorboard_log import read_events

# few steps, few images: the mechanics, not the quality (equal set sizes: one dataset per request)
FAST = ["steps=2", "batch_size=8", "checkpoint_every=2", "data.forget_images=8", "data.retain_images=8",
        "data.prior_images=8", "data.num_inference_steps=2", "data.gen_batch_size=8", "eval.images_per_prompt=1",
        "eval.prompts_per_concept=1", "eval.num_inference_steps=2", "eval.fid_reference_images=16",
        "eval.batch_size=32", "tensorboard=true"]
ATTACK = AttackConfig(enabled=True, steps=2, images=2, eval_images=2, batch_size=2)
ATTACK_ARGS = ["attack.steps=2", "attack.images=2", "attack.eval_images=2", "attack.batch_size=2"]
METHODS = ["dfr", "finetune"]


# ----------------------------------------------------------------------------- table logic
def _row(**kw):
    base = {"UA": 0.97, "IRA": 0.9, "IRA_base": 0.95, "CRA": 0.95, "CRA_base": 1.0, "NRA": 0.8, "NRA_base": 0.9,
            "fid_proxy": 11.0, "fid_ratio": 1.1, "alignment": 0.9, "k": 10, "target": "bricks"}
    return {**base, **kw}


def test_targets_compare_with_the_base_model():
    t = B.Targets()
    met = t.check({**_row(), "wall_s": 600.0})
    # IRA 0.9 >= 0.9 * 0.95; CRA 0.95 >= 0.95 * 1.0 (boundary counts); NRA 0.8 >= 0.85 * 0.9 = 0.765
    assert met == {"UA": True, "IRA": True, "CRA": True, "NRA": True, "FID": True, "time": True}
    bad = t.check({**_row(UA=0.9, IRA=0.8, CRA=0.9, NRA=0.7, fid_ratio=1.3), "wall_s": 901.0})
    assert bad == {k: False for k in bad}
    assert t.check({**_row(NRA_base=math.nan), "wall_s": math.nan})["NRA"] is None


def test_table_files(tmp_path):
    rows = B.table_rows({"dfr": _row(), "esd": _row(UA=0.5, attack_success=0.75, attack_before=0.0)},
                        {"dfr": 500.0, "esd": 1000.0})
    assert [r["all_met"] for r in rows] == [True, False] and [r["targets_apply"] for r in rows] == [True, False]
    csv_path, md_path = B.write_table(rows, tmp_path, requests="benchmark10.txt")
    with open(csv_path) as fh:
        table = list(csv.DictReader(fh))
    assert table[1]["met_UA"] == "False" and table[1]["met_time"] == "False" and table[0]["all_met"] == "True"
    assert table[0]["attack_success"] == "" and float(table[1]["attack_success"]) == 0.75
    md = md_path.read_text()
    assert "| dfr | 97.0 % ✓ |" in md and "esd (reference)" in md and "75.0 % (before 0.0 %)" in md
    assert "0.900 (0.95× base)" in md and "16.7 min" in md


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    req = root / "requests.txt"
    req.write_text("circle -> square\nhorizontal stripes -> plain\n")
    logs: list[str] = []
    table = B.run_benchmark(METHODS, req, root / "out", FAST, attack=ATTACK, log=logs.append)
    return root / "out", req, table, logs


@pytest.mark.slow
def test_runs_write_tensorboard_logs(bench):
    out, _, _, _ = bench
    events = read_events(out / "dfr" / "tensorboard")
    # train scalars at the last step of each request (steps=2): global steps 2 and 4
    assert sorted(s for tag, s, _ in events if tag == "train/loss") == [2, 4]
    assert {"train/grad_norm", "train/unlearn", "train/preserve"} <= {tag for tag, _, _ in events}
    with open(out / "dfr" / "report" / "metrics.csv") as fh:
        report = {int(r["k"]): r for r in csv.DictReader(fh)}
    for k in (1, 2):  # every evaluated request: its metrics as in the report, and its grid
        for name in ("UA", "IRA", "fid_proxy"):
            logged = [v for tag, s, v in events if tag == f"eval/{name}" and s == k]
            assert logged == [pytest.approx(float(report[k][name]), rel=1e-6)], (name, k)
        grid = Image.open(grid_path(out / "dfr" / "report", k)).size
        assert [v for tag, s, v in events if tag == "eval/grid" and s == k] == [grid]


@pytest.mark.slow
def test_benchmark_writes_table_curves_and_rows(bench):
    out, _, table, _ = bench
    for name in ("benchmark_table.md", "benchmark_table.csv", "benchmark_curves.png", "benchmark_rows.csv",
                 "benchmark_rows.json", "benchmark_attack.csv"):
        assert (out / name).is_file(), name
    with open(out / "benchmark_table.csv") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        cols = reader.fieldnames
    assert cols == list(B.TABLE_COLUMNS) + [f"met_{t}" for t in B.TARGET_NAMES] + ["all_met", "targets_apply"]
    assert [r["method"] for r in rows] == METHODS and all(r["k"] == "2" for r in rows)
    for r in rows:
        for c in ("UA", "IRA", "IRA_base", "CRA", "CRA_base", "NRA_base", "fid_proxy", "fid_ratio", "attack_success",
                  "wall_s"):
            assert math.isfinite(float(r[c])), (r["method"], c)
        assert 0 <= float(r["attack_success"]) <= 1 and float(r["wall_s"]) > 0
        assert r["met_UA"] in ("True", "False") and r["met_time"] == "True"
    md = (out / "benchmark_table.md").read_text()
    assert "| dfr |" in md and "| finetune (reference) |" in md
    all_rows = json.loads((out / "benchmark_rows.json").read_text())
    assert sorted((r["method"], r["k"]) for r in all_rows) == [(m, k) for m in METHODS for k in (0, 1, 2)]
    with open(out / "benchmark_attack.csv") as fh:
        attack = list(csv.DictReader(fh))
    assert {(a["method"], a["concept"]) for a in attack} == {(m, c) for m in METHODS
                                                             for c in ("circle", "horizontal stripes")}
    assert Image.open(out / "benchmark_curves.png").size[0] > 600
    # each run's own report: grids per request and the attack grid of the last one
    rep = out / "dfr" / "report"
    assert {p.name for p in rep.glob("grid_k*.png")} == {"grid_k00.png", "grid_k01.png", "grid_k02.png"}
    assert (rep / "attack_k02.png").is_file() and (rep / "report.html").is_file()
    assert table[0]["method"] == "dfr" and isinstance(table[0]["all_met"], bool)


@pytest.mark.slow
def test_benchmark_rerun_skips_finished_methods(bench, monkeypatch):
    out, req, _, _ = bench
    before = {m: json.loads((out / m / B.TIMING_FILE).read_text()) for m in METHODS}
    import jaxforget.engine as E

    monkeypatch.setattr(E, "ContinualRun", lambda *a, **k: pytest.fail("a finished method was run again"))
    logs: list[str] = []
    table = B.run_benchmark(METHODS, req, out, FAST, attack=ATTACK, log=logs.append)
    assert sum("skipping training" in line for line in logs) == 2
    assert {m: json.loads((out / m / B.TIMING_FILE).read_text()) for m in METHODS} == before
    assert [r["wall_s"] for r in table] == [B.wall_seconds(out / m) for m in METHODS]


@pytest.mark.slow
def test_evaluate_command_rebuilds_the_report_from_the_cache(bench, monkeypatch):
    import shutil

    from jaxforget.cli import main
    from jaxforget.eval import evaluate as E

    out = bench[0]
    run_dir = out / "dfr"
    old = json.loads((run_dir / "report" / "metrics.json").read_text())
    shutil.rmtree(run_dir / "report")
    calls = []
    real = E._generate_jit
    monkeypatch.setattr(E, "_generate_jit", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert main(["--run-dir", str(run_dir), "--attack", *ATTACK_ARGS], command="evaluate") == 0
    assert not calls  # every snapshot (and the base model) came from the cache
    new = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert [r["k"] for r in new] == [0, 1, 2]
    for a, b in zip(old, new):
        for key in ("UA", "IRA", "CRA", "NRA", "ACC", "fid_proxy", "IRA_base", "attack_success"):
            assert a.get(key) == b.get(key), (a["k"], key)
    assert new[2]["attack_success/circle"] == old[2]["attack_success/circle"]
    assert (run_dir / "report" / "grid_k02.png").is_file() and (run_dir / "report" / "report.html").is_file()


def test_evaluate_command_errors(tmp_path, capsys):
    from jaxforget.cli import main

    assert main(["--run-dir", str(tmp_path / "none")], command="evaluate") == 2
    assert "not a jaxforget run directory" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path), "oops"], command="evaluate") == 2
    assert "key=value" in capsys.readouterr().err


def test_benchmark_errors(tmp_path, capsys):
    req = tmp_path / "r.txt"
    req.write_text("circle -> square\n")
    assert B.main(["--methods", "nosuch", "--requests", str(req), "--out", str(tmp_path / "o")]) == 2
    assert "no config" in capsys.readouterr().err
    assert B.main(["--methods", "dfr", "--requests", str(tmp_path / "missing.txt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert B.main(["--methods", "dfr", "--requests", str(req), "--out", str(tmp_path / "o"), "--attack",
                   "attack.steps=0"]) == 2
    assert "attack.steps" in capsys.readouterr().err
