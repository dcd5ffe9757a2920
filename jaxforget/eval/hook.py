"""Evaluation inside a continual run: after each request (and once for the base model), generate
with fixed seeds, judge, score (UA / IRA / CRA / NRA / FID proxy / alignment), and refresh the
run's report (grid per request, curves, metrics.json/csv, report.html). Also the standalone
``jaxforget evaluate --run-dir`` over an existing run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from jaxforget.eval import report as R
from jaxforget.eval.evaluate import EvalConfig, evaluate_model
from jaxforget.eval.judges import load_judge


def eval_config(hook: Any) -> EvalConfig:
    return EvalConfig(images_per_prompt=hook.images_per_prompt, prompts_per_concept=hook.prompts_per_concept,
                      seed=hook.seed, num_inference_steps=hook.num_inference_steps,
                      guidance_scale=hook.guidance_scale, sampler=hook.sampler, batch_size=hook.batch_size,
                      fid_reference_images=hook.fid_reference_images)


def _catalogue(judge_spec: str) -> Any:
    from jaxforget.toyworld.catalogue import load_catalogue

    return load_catalogue()


class RunEvaluator:
    """Called by the engine after each snapshot: ``(run, snapshot_id, student_state, removed
    targets incl. the current one, request) -> metrics``."""

    def __init__(self, hook: Any, method: str = ""):
        self.hook = hook
        self.method = method
        self.cfg = eval_config(hook)
        self.judge = load_judge(hook.judge)
        self.catalogue = _catalogue(hook.judge)

    def _domain(self, name: str) -> str:
        try:
            return self.catalogue.concept(name).domain
        except KeyError:
            return "any"

    def _evaluate(self, run: Any, state: Any, removed: Sequence[str], key: str) -> Any:
        pairs = [(t, self._domain(t)) for t in removed]
        return evaluate_model(run.model, self.judge, self.catalogue, removed=pairs[:-1] if pairs else (),
                              current=pairs[-1] if pairs else None, cfg=self.cfg, unet_state=state,
                              cache_dir=Path(run.run_dir) / "eval_cache", cache_key=key)

    def __call__(self, run: Any, snapshot: int, state: Any, removed: Sequence[str], request: Any) -> dict:
        report_dir = Path(run.run_dir) / "report"
        rows = load_rows(report_dir)
        chain = run.store.ledger()
        if not any(r.get("k") == 0 for r in rows):
            base = self._evaluate(run, run.base_state, [], f"base-{run.base_hash}")
            rows.append(base.row(k=0, snapshot=0, target="", method=self.method))
            R.concept_grid(base.images, [], report_dir / "grid_k00.png", title="k=0 (base model)")
        meta = run.store.metadata(snapshot)
        res = self._evaluate(run, state, removed, f"snap-{meta.get('params_hash', snapshot)}")
        k = len(chain)
        rows = [r for r in rows if r.get("k") != k] + [res.row(k=k, snapshot=snapshot, target=request.target,
                                                               method=self.method)]
        rows.sort(key=lambda r: r["k"])
        R.concept_grid(res.images, list(removed), report_dir / f"grid_k{k:02d}.png",
                       title=f"k={k}: after removing {request.target!r}")
        write_report(report_dir, rows)
        return dict(res.metrics)


def load_rows(report_dir: Path) -> list[dict]:
    path = report_dir / "metrics.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return list(data["rows"] if isinstance(data, dict) else data)


def write_report(report_dir: Path, rows: list[dict]) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    R.write_metrics(rows, report_dir)
    grids = {p.stem: p for p in sorted(report_dir.glob("grid_k*.png"))}
    return R.write_html_report(report_dir, rows, grids)


def make_evaluator(cfg: Any) -> RunEvaluator | None:
    """The engine's evaluation hook from a RunConfig (None when eval.every is 0)."""
    if not cfg.eval.every:
        return None
    return RunEvaluator(cfg.eval, method=cfg.method)


__all__ = ["RunEvaluator", "make_evaluator", "eval_config", "write_report", "load_rows"]
