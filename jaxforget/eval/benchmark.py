"""The continual-unlearning benchmark of benchmark.md: the same request sequence (10 requests on
the toy world) for several methods, each in its own run directory, evaluated after every request,
optionally attacked at the end; then one table and one figure comparing the methods.

    python launch/benchmark.py --methods dfr,duge,esd,finetune \\
        [--requests configs/toyworld/benchmark10.txt] [--out runs/benchmark] [--attack] [key=value ...]

For each method: ``<config-dir>/<method>.yaml`` + ``eval.every=1`` + the overrides (applied to
every method; ``attack.*`` ones go to the attack) -> ``<out>/<method>``, run by the engine's
``ContinualRun`` (resumable: a re-run skips requests already in the run's ledger and methods
that are complete). Written to ``<out>``:

- ``benchmark_table.md`` / ``.csv``: per method at k = K: UA, IRA, CRA, NRA (each beside the base
  model's score on the same concept sets), FID proxy and its ratio to the base model's,
  alignment, attack success, wall time, and whether each target of benchmark.md is met (the
  targets are stated for DFR and DUGE; the other methods are measured against the same bars).
- ``benchmark_curves.png``: metrics over requests k = 0..K, one line per method.
- ``benchmark_rows.csv`` / ``.json``: every row (method, k) of every run.
- ``benchmark_attack.csv`` (with ``--attack``): per method and removed concept, the judged rate
  without / with the adversarial prefix and the base model's rate.

Wall time per method is the sum over the invocations that trained it (model load, compiles,
data generation, training and evaluation), kept in ``<out>/<method>/benchmark_timing.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxforget.errors import ConfigError, JaxforgetError
from jaxforget.eval import report as R
from jaxforget.eval.attack import AttackConfig

REPO = Path(__file__).resolve().parents[2]
DEFAULT_METHODS = ("dfr", "duge", "esd", "finetune")
TARGET_METHODS = ("dfr", "duge")  # benchmark.md states its targets for these
CURVES = ("UA", "IRA", "CRA", "NRA", "ACC", "fid_ratio", "alignment")
TIMING_FILE = "benchmark_timing.json"


@dataclass(frozen=True)
class Targets:
    """benchmark.md's bars at k = K (ratios are to the base model on the same concept sets)."""

    ua: float = 0.95
    ira: float = 0.9
    cra: float = 0.95
    nra: float = 0.85
    fid: float = 1.2
    seconds: float = 15 * 60.0

    def check(self, row: dict[str, Any]) -> dict[str, bool | None]:
        """target -> met (None when a number is missing)."""

        def ge(v: Any, bar: float) -> bool | None:
            return None if not _finite(v) or not math.isfinite(bar) else bool(float(v) >= bar - 1e-12)

        return {
            "UA": ge(row.get("UA"), self.ua),
            "IRA": ge(row.get("IRA"), self.ira * _f(row.get("IRA_base"))),
            "CRA": ge(row.get("CRA"), self.cra * _f(row.get("CRA_base"))),
            "NRA": ge(row.get("NRA"), self.nra * _f(row.get("NRA_base"))),
            "FID": None if not _finite(row.get("fid_ratio")) else bool(float(row["fid_ratio"]) <= self.fid + 1e-12),
            "time": None if not _finite(row.get("wall_s")) else bool(float(row["wall_s"]) <= self.seconds),
        }


def _f(v: Any) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _finite(v: Any) -> bool:
    return math.isfinite(_f(v))


# ----------------------------------------------------------------------------- one method
def method_config(method: str, config_dir: Path, out: Path, overrides: Sequence[str]) -> Any:
    """The RunConfig of one method: its YAML, evaluation after every request, the overrides,
    and its own run directory under ``out``."""
    from jaxforget.config import load_config
    from jaxforget.engine import RunConfig

    path = config_dir / f"{method}.yaml"
    if not path.is_file():
        raise ConfigError(f"--methods: no config {path} for method {method!r}")
    cfg = load_config(RunConfig, path, ["eval.every=1", *overrides, f"run_dir={out / method}"])
    if cfg.method != method:
        raise ConfigError(f"{path}: runs method {cfg.method!r}, not {method!r}")
    return cfg


def _ledger(run_dir: Path) -> list[str]:
    from jaxforget.checkpoints import RunStore

    if not (run_dir / "run.json").exists():
        return []
    with RunStore.open(run_dir, create=False, lock=False) as store:
        return store.applied_targets()


def _timing(run_dir: Path) -> dict[str, Any]:
    path = run_dir / TIMING_FILE
    return json.loads(path.read_text()) if path.exists() else {"invocations": []}


def wall_seconds(run_dir: Path) -> float:
    """Seconds spent by the benchmark invocations that trained this run (NaN if none recorded)."""
    inv = _timing(run_dir)["invocations"]
    return float(sum(i["seconds"] for i in inv)) if inv else math.nan


def run_method(
    method: str,
    requests: Path,
    out: Path,
    overrides: Sequence[str] = (),
    *,
    config_dir: Path = REPO / "configs" / "toyworld",
    attack: AttackConfig | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run (or resume, or skip when complete) one method on the requests; evaluate (and attack
    the final model) through the run's cache; return its report rows, k = 0..K."""
    from jaxforget.engine import ContinualRun
    from jaxforget.eval.hook import evaluate_run, load_rows, make_evaluator
    from jaxforget.requests import parse_requests

    cfg = method_config(method, config_dir, out, overrides)
    run_dir = Path(cfg.run_dir)
    wanted = [r.target.lower() for r in parse_requests(requests)]
    applied = [t.lower() for t in _ledger(run_dir)]
    if applied == wanted:
        log(f"[{method}] all {len(wanted)} requests already applied in {run_dir}: skipping training")
    else:
        t0 = time.perf_counter()
        done: list[int] = []
        run = None
        try:
            run = ContinualRun(cfg, evaluator=make_evaluator(cfg), log=lambda m: log(f"[{method}] {m}"))
            done = [s.index for s in run.run(requests)]
        finally:
            if run is not None:
                run.close()
            # recorded even when interrupted: a resumed run's wall time includes the lost work
            timing = _timing(run_dir)
            timing["invocations"].append({"seconds": round(time.perf_counter() - t0, 3), "requests": done,
                                          "finished": [t.lower() for t in _ledger(run_dir)] == wanted})
            if run_dir.exists():
                (run_dir / TIMING_FILE).write_text(json.dumps(timing, indent=1) + "\n")
    rows = load_rows(run_dir / "report")
    have = {int(r["k"]) for r in rows if r.get("k") is not None}
    need_attack = attack is not None and not _finite((max(rows, key=lambda r: r["k"]) if rows else {}).get(
        "attack_success"))
    if not set(range(len(wanted) + 1)) <= have or need_attack or any("IRA_base" not in r for r in rows):
        # missing rows (evaluation was off, or an older report) or the final attack: through the cache
        rows = evaluate_run(run_dir, overrides=[o for o in overrides if o.startswith("eval.")], attack=attack,
                            log=lambda m: log(f"[{method}] {m}"))
    for r in rows:
        r["method"] = method
    return rows


# ----------------------------------------------------------------------------- table + figure
TABLE_COLUMNS = ("method", "k", "target", "UA", "IRA", "IRA_base", "CRA", "CRA_base", "NRA", "NRA_base", "ACC",
                 "fid_proxy", "fid_ratio", "alignment", "attack_success", "attack_before", "wall_s")
TARGET_NAMES = ("UA", "IRA", "CRA", "NRA", "FID", "time")


def table_rows(final_rows: dict[str, dict[str, Any]], wall: dict[str, float],
               targets: Targets = Targets()) -> list[dict[str, Any]]:
    """Per method: its row at k = K, wall time, and ``met_<target>`` flags (+ ``all_met``)."""
    out = []
    for method, row in final_rows.items():
        r = {c: row.get(c, math.nan) for c in TABLE_COLUMNS}
        r["method"] = method
        r["wall_s"] = wall.get(method, math.nan)
        met = targets.check(r)
        r.update({f"met_{k}": v for k, v in met.items()})
        r["all_met"] = all(v is True for v in met.values())
        r["targets_apply"] = method in TARGET_METHODS
        out.append(r)
    return out


def _pct(v: Any) -> str:
    return f"{100 * float(v):.1f} %" if _finite(v) else "–"


def _ratio(v: Any, base: Any) -> str:
    if not _finite(v):
        return "–"
    return f"{float(v):.3f} ({float(v) / float(base):.2f}× base)" if _finite(base) and float(base) else f"{float(v):.3f}"


def _mark(v: bool | None) -> str:
    return "?" if v is None else ("✓" if v else "✗")


def write_table(rows: list[dict[str, Any]], out: Path, targets: Targets = Targets(),
                requests: str = "") -> tuple[Path, Path]:
    """``benchmark_table.csv`` (numbers and flags) and ``benchmark_table.md`` (readable)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "benchmark_table.csv", out / "benchmark_table.md"
    cols = list(TABLE_COLUMNS) + [f"met_{t}" for t in TARGET_NAMES] + ["all_met", "targets_apply"]
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if isinstance(r.get(c), float) and not math.isfinite(r[c]) else
                        ("" if r.get(c) is None else r.get(c)) for c in cols])
    lines = [
        "# Continual-unlearning benchmark" + (f" ({requests})" if requests else ""),
        "",
        f"Per method after the last request (k = {rows[0]['k'] if rows else '?'}). Ratios are to the base "
        "model on the same concept sets. Targets (benchmark.md, stated for dfr and duge): "
        f"UA ≥ {targets.ua:.0%}, IRA ≥ {targets.ira}× base, CRA ≥ {targets.cra}× base, NRA ≥ {targets.nra}× base, "
        f"FID proxy ≤ {targets.fid}× base, wall time ≤ {targets.seconds / 60:.0f} min.",
        "",
        "| method | UA | IRA | CRA | NRA | FID proxy | alignment | attack success | wall time | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = " ".join(f"{t} {_mark(r.get(f'met_{t}'))}" for t in TARGET_NAMES)
        fid = (f"{float(r['fid_proxy']):.3g} ({float(r['fid_ratio']):.2f}× base)"
               if _finite(r.get("fid_proxy")) and _finite(r.get("fid_ratio")) else "–")
        wall = f"{float(r['wall_s']) / 60:.1f} min" if _finite(r.get("wall_s")) else "–"
        attack = (f"{_pct(r['attack_success'])} (before {_pct(r.get('attack_before'))})"
                  if _finite(r.get("attack_success")) else "–")
        name = r["method"] + ("" if r.get("targets_apply") else " (reference)")
        lines.append(f"| {name} | {_pct(r.get('UA'))} {_mark(r.get('met_UA'))} | {_ratio(r.get('IRA'), r.get('IRA_base'))} "
                     f"| {_ratio(r.get('CRA'), r.get('CRA_base'))} | {_ratio(r.get('NRA'), r.get('NRA_base'))} | {fid} "
                     f"| {_f(r.get('alignment')):.3f} | {attack} | {wall} | {met} |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_attack_table(per_method: dict[str, Path], out: Path) -> Path | None:
    """``benchmark_attack.csv`` from each run's last ``report/attack_kNN.json``."""
    lines = []
    for method, run_dir in per_method.items():
        files = sorted((run_dir / "report").glob("attack_k*.json"))
        if not files:
            continue
        for concept, s in json.loads(files[-1].read_text()).items():
            lines.append([method, files[-1].stem.split("_k")[-1], concept, s.get("domain"), s.get("teacher_rate"),
                          s.get("before"), s.get("after")])
    if not lines:
        return None
    path = out / "benchmark_attack.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "k", "concept", "domain", "base_rate", "before", "after"])
        w.writerows(lines)
    return path


def run_benchmark(
    methods: Sequence[str],
    requests: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    *,
    config_dir: str | Path = REPO / "configs" / "toyworld",
    attack: AttackConfig | None = None,
    targets: Targets = Targets(),
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every method in turn (see the module doc); returns the table rows."""
    requests, out, config_dir = Path(requests), Path(out), Path(config_dir)
    if not requests.is_file():
        raise ConfigError(f"--requests: {requests} not found")
    if not methods:
        raise ConfigError("--methods: name at least one method")
    all_rows: list[dict[str, Any]] = []
    final: dict[str, dict[str, Any]] = {}
    wall: dict[str, float] = {}
    for method in methods:
        rows = run_method(method, requests, out, overrides, config_dir=config_dir, attack=attack, log=log)
        all_rows += rows
        final[method] = max(rows, key=lambda r: r["k"])
        wall[method] = wall_seconds(out / method)
        log(f"[{method}] k={final[method]['k']}: " + " ".join(
            f"{m}={_f(final[method].get(m)):.3f}" for m in ("UA", "IRA", "CRA", "NRA", "fid_ratio", "attack_success")
            if _finite(final[method].get(m))) + f", wall {wall[method]:.0f}s")
    table = table_rows(final, wall, targets)
    write_table(table, out, targets, requests=requests.name)
    R.write_metrics(all_rows, out, stem="benchmark_rows")
    metrics = [m for m in CURVES + ("attack_success",) if any(_finite(r.get(m)) for r in all_rows)]
    R.plot_curves(all_rows, out / "benchmark_curves.png", metrics,
                  title=f"continual unlearning, {requests.name}: one line per method")
    write_attack_table({m: out / m for m in methods}, out)
    log(f"benchmark: {out / 'benchmark_table.md'}, {out / 'benchmark_curves.png'}")
    return table


# ----------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/benchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods")
    parser.add_argument("--requests", default=str(REPO / "configs" / "toyworld" / "benchmark10.txt"))
    parser.add_argument("--out", default="runs/benchmark")
    parser.add_argument("--config-dir", default=str(REPO / "configs" / "toyworld"),
                        help="folder of <method>.yaml run configs")
    parser.add_argument("--attack", action="store_true", help="soft-prompt attack on the removed concepts at the end")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every method's run config; "
                                                     "attack.key=value for the attack")
    args = parser.parse_args(argv)
    from jaxforget.distributed import enable_compilation_cache

    enable_compilation_cache()  # the methods' steps and samplers compile once, not once per run
    try:
        from jaxforget.config import load_config

        for item in args.overrides:
            if "=" not in item:
                raise ConfigError(f"command line: expected key=value, got {item!r}")
        attack_over = [o[len("attack."):] for o in args.overrides if o.startswith("attack.")]
        run_over = [o for o in args.overrides if not o.startswith("attack.")]
        attack = load_config(AttackConfig, None, ["enabled=true", *attack_over]) if args.attack else None
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        run_benchmark(methods, args.requests, args.out, run_over, config_dir=args.config_dir, attack=attack)
    except JaxforgetError as err:
        import sys

        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


__all__ = ["Targets", "run_benchmark", "run_method", "method_config", "table_rows", "write_table", "wall_seconds",
           "main"]
