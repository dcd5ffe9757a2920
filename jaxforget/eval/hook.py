"""Evaluation inside a continual run: after each request (and once for the base model), generate
with fixed seeds, judge, score (UA / IRA / CRA / NRA / FID proxy / alignment), and refresh the
run's report (grid per request, curves, metrics.json/csv, report.html). Also the standalone
``jaxforget evaluate --run-dir DIR`` over an existing run (``evaluate_run``).

Every row also carries the base model's scores on the same concept sets (``UA_base``,
``IRA_base``, ``CRA_base``, ``NRA_base``, ``ACC_base``) and ``fid_ratio`` = FID proxy / the base
model's on the same retained prompts (both leave out the prompts of removed concepts; see
``evaluate.retained_features``): benchmark.md's "× base" targets compare like with like. With the attack on
(``AttackConfig.enabled``), rows get ``attack_success`` / ``attack_before`` and
``attack_success/<concept>`` for every removed concept (see ``jaxforget.eval.attack``).

Which concepts are scored: the toy world's catalogue, or for a real model the ``eval.concept_set``
file (``jaxforget.eval.concepts``) with a CLIP judge (``eval.judge=clip:<folder>``) whose labels
are the set's concepts. A concept set has nothing to render, so there ``fid_proxy`` and ``cmmd``
are distances to the base model's images of the same retained prompts and seeds (0 at k = 0,
``fid_ratio`` NaN). The judge and every request target are checked against the set before any
training (``check_targets``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxforget.eval import report as R
from jaxforget.eval.attack import AttackConfig, attack_concepts, attack_grid, attack_row
from jaxforget.errors import ConfigError
from jaxforget.eval.evaluate import EvalConfig, EvalResult, is_toyworld, evaluate_model, retained_features
from jaxforget.eval.judges import load_judge
from jaxforget.eval.metrics import continual_metrics, frechet_distance

RELATIVE = ("UA", "IRA", "CRA", "NRA", "ACC")


def eval_config(hook: Any) -> EvalConfig:
    return EvalConfig(images_per_prompt=hook.images_per_prompt, prompts_per_concept=hook.prompts_per_concept,
                      seed=hook.seed, num_inference_steps=hook.num_inference_steps,
                      guidance_scale=hook.guidance_scale, sampler=hook.sampler, batch_size=hook.batch_size,
                      fid_reference_images=hook.fid_reference_images)


def attack_settings(hook: Any, attack: AttackConfig | None = None) -> AttackConfig | None:
    """The attack to run at each evaluation: ``attack`` if given, else the hook's ``attack``
    field (an AttackConfig, once EvalHook has one); None when off. Sampling follows the
    evaluation's settings, so attacked images are comparable with the evaluation's."""
    cfg = attack if attack is not None else getattr(hook, "attack", None)
    if cfg is None or not cfg.enabled:
        return None
    return dataclasses.replace(cfg, num_inference_steps=hook.num_inference_steps,
                               guidance_scale=hook.guidance_scale, sampler=hook.sampler)


def eval_concepts(hook: Any) -> Any:
    """The concepts a run is scored on: the ``eval.concept_set`` file (real models, see
    ``jaxforget.eval.concepts``) or, without one, the toy world's catalogue."""
    path = getattr(hook, "concept_set", "")
    if path:
        from jaxforget.eval.concepts import load_concept_set

        return load_concept_set(path)
    from jaxforget.toyworld.catalogue import load_catalogue

    return load_catalogue()


def _check_judge(judge: Any, concepts: Any) -> None:
    """Every concept of the set must be one the judge can detect in its domain (fails before any
    training, not at the first evaluation)."""
    src = getattr(concepts, "source", "") or "eval concepts"
    for c in concepts.concepts:
        try:
            names = judge.concept_names(c.domain)
        except (KeyError, ValueError, ConfigError):  # the toy judge raises ValueError
            names = ()
        if c.name not in names:
            raise ConfigError(f"{src}: concept {c.name!r} ({c.domain}) is unknown to the judge {judge.name!r}")
        if getattr(judge, "mode", "") == "argmax" and len(names) < 2:
            raise ConfigError(f"{src}: domain {c.domain!r} has one concept; the CLIP judge picks the best of a "
                              "domain's concepts, so it needs two or more")


class RunEvaluator:
    """Called by the engine after each snapshot: ``(run, snapshot_id, student_state, removed
    targets incl. the current one, request) -> metrics``. ``run`` needs ``model``, ``run_dir``,
    ``store``, ``base_state`` and ``base_hash`` (a ``ContinualRun``, or ``evaluate_run``'s
    stand-in)."""

    def __init__(self, hook: Any, method: str = "", *, attack: AttackConfig | None = None,
                 log: Callable[[str], None] | None = None):
        self.hook = hook
        self.method = method
        self.cfg = eval_config(hook)
        self.attack = attack_settings(hook, attack)
        self.catalogue = eval_concepts(hook)
        self.real = not is_toyworld(self.catalogue)
        if self.real and hook.judge.split(":")[0] != "clip":
            raise ConfigError(f"eval.concept_set ({self.catalogue.source}) needs a CLIP judge "
                              "(eval.judge=clip:<folder>): the toy-world judge knows only the toy world")
        # a CLIP judge's labels are the set's concepts, by domain (None: a judge's own default)
        self.judge = load_judge(hook.judge, catalogue=self.catalogue if self.real else None)
        _check_judge(self.judge, self.catalogue)
        self.log = log
        self._base: dict[str, EvalResult] = {}

    def _domain(self, name: str) -> str:
        try:
            return self.catalogue.concept(name).domain
        except KeyError:
            return "any"

    def _pairs(self, removed: Sequence[str]) -> list[tuple[str, str]]:
        return [(t, self._domain(t)) for t in removed]

    def check_targets(self, requests: Sequence[Any], source: str) -> None:
        """Before training: every request's target must be a concept of the evaluated set, in
        the request's domain (UA scores a removed concept by its evaluation prompts)."""
        src = getattr(self.catalogue, "source", "") or "the evaluated concepts"
        for r in requests:
            where = f"{source}:{r.line}" if getattr(r, "line", 0) else source
            try:
                concept = self.catalogue.concept(r.target)
            except KeyError:
                raise ConfigError(f"{where}: target {r.target!r} is not a concept of {src}, which the evaluation "
                                  "scores (add it there, or set eval.every=0)") from None
            if r.domain not in ("any", concept.domain):
                raise ConfigError(f"{where}: target {r.target!r} has domain {r.domain!r}, but {concept.domain!r} "
                                  f"in {src}")

    def _evaluate(self, run: Any, state: Any, removed: Sequence[str], key: str,
                  reference: Any = None) -> EvalResult:
        pairs = self._pairs(removed)
        return evaluate_model(run.model, self.judge, self.catalogue, removed=pairs[:-1] if pairs else (),
                              current=pairs[-1] if pairs else None, cfg=self.cfg, unet_state=state,
                              cache_dir=Path(run.run_dir) / "eval_cache", cache_key=key, reference=reference)

    def base_result(self, run: Any) -> EvalResult:
        """The base model's evaluation (cached on disk and, per run, in memory)."""
        key = f"base-{run.base_hash}"
        if key not in self._base:
            res = self._evaluate(run, run.base_state, [], key)
            if self.real:
                # a concept set has no rendered references: FID proxy / CMMD measure the distance
                # to the base model's own images (same prompts, same seeds), zero for the base
                res.metrics.update({"fid_proxy": 0.0, "cmmd": 0.0})
            self._base[key] = res
        return self._base[key]

    def _reference(self, run: Any) -> Any:
        return self.base_result(run).features if self.real else None

    def relative(self, base: EvalResult, result: EvalResult, removed: Sequence[str]) -> dict[str, float]:
        """The base model's scores on the same concept sets as ``result`` and the FID ratio."""
        pairs = self._pairs(removed)
        ref = continual_metrics(base.detection, pairs[:-1] if pairs else (), pairs[-1] if pairs else None,
                                self.catalogue)
        out = {f"{m}_base": ref[m] for m in RELATIVE}
        # the base model's FID proxy on the same (retained) prompts as ``result``'s
        feats, ref = retained_features(base.features, self.judge, self.catalogue, self.cfg, list(removed))
        fid0 = frechet_distance(feats, ref) if ref is not None and len(ref) > 1 and len(feats) > 1 else math.nan
        fid = result.metrics.get("fid_proxy", math.nan)
        out["fid_ratio"] = fid / fid0 if fid0 and math.isfinite(fid0) and math.isfinite(fid) else math.nan
        return out

    def base_row(self, run: Any, report_dir: Path) -> dict[str, Any]:
        base = self.base_result(run)
        R.concept_grid(base.images, [], grid_path(report_dir, 0), title="k=0 (base model)")
        return base.row(k=0, snapshot=0, target="", domain="", method=self.method,
                        **self.relative(base, base, []))

    def snapshot_row(self, run: Any, k: int, snapshot: int, state: Any, removed: Sequence[str],
                     report_dir: Path, *, attack: AttackConfig | None = None) -> dict[str, Any]:
        """Evaluate one snapshot (request k, ``removed`` = targets 1..k), write its grid (and,
        with an attack, its attack grid), return its report row."""
        meta = run.store.metadata(snapshot)
        key = f"snap-{meta.get('params_hash', snapshot)}"
        res = self._evaluate(run, state, removed, key, reference=self._reference(run))
        target = removed[-1] if removed else ""
        row = res.row(k=k, snapshot=snapshot, target=target, domain=self._domain(target), method=self.method,
                      **self.relative(self.base_result(run), res, removed))
        R.concept_grid(res.images, list(removed), grid_path(report_dir, k),
                       title=f"k={k}: after removing {target!r}")
        attack = attack or self.attack
        if attack is not None and removed:
            results = attack_concepts(run.model, run.base_state, state, self._pairs(removed), self.judge,
                                      self.catalogue, attack, cache_dir=Path(run.run_dir) / "eval_cache",
                                      cache_key=key, log=self.log)
            row.update(attack_row(results))
            attack_grid(results, report_dir / f"attack_k{k:02d}.png",
                        title=f"k={k}: soft-prompt attack (base / before / attacked)")
            (report_dir / f"attack_k{k:02d}.json").write_text(
                json.dumps(R._jsonable({c: r.summary() for c, r in results.items()}), indent=1) + "\n")
        return row

    def __call__(self, run: Any, snapshot: int, state: Any, removed: Sequence[str], request: Any) -> dict:
        report_dir = Path(run.run_dir) / "report"
        rows = load_rows(report_dir)
        if not any(r.get("k") == 0 for r in rows):
            rows.append(self.base_row(run, report_dir))
        k = len(run.store.chain())
        row = self.snapshot_row(run, k, snapshot, state, list(removed), report_dir)
        rows = [r for r in rows if r.get("k") != k] + [row]
        rows.sort(key=lambda r: r["k"])
        write_report(report_dir, rows)
        out = {m: v for m, v in row.items() if m not in ("k", "snapshot", "target", "domain", "method")}
        return out | {"grid": str(grid_path(report_dir, k))}  # for the run's TensorBoard log


def grid_path(report_dir: Path, k: int) -> Path:
    """The image grid of the model after request k (k = 0: the base model)."""
    return report_dir / f"grid_k{k:02d}.png"


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
    grids.update({p.stem: p for p in sorted(report_dir.glob("attack_k*.png"))})
    return R.write_html_report(report_dir, rows, grids)


def make_evaluator(cfg: Any) -> RunEvaluator | None:
    """The engine's evaluation hook from a RunConfig (None when eval.every is 0)."""
    if not cfg.eval.every:
        return None
    return RunEvaluator(cfg.eval, method=cfg.method)


# ----------------------------------------------------------------------------- standalone
@dataclass
class _StoredRun:
    """What RunEvaluator needs of a run, for a run directory read from disk."""

    model: Any
    run_dir: Path
    store: Any
    base_state: Any
    base_hash: str


def load_run_config_from_dir(run_dir: Path, store: Any, overrides: Sequence[str] = ()) -> Any:
    """The RunConfig a run was made with: ``config.json`` of its latest invocation (or its head
    snapshot's), with ``key=value`` overrides (e.g. ``eval.images_per_prompt=8``)."""
    from jaxforget.config import apply_overrides, from_dict
    from jaxforget.engine import RunConfig

    path = run_dir / "config.json"
    if path.exists():
        data, source = json.loads(path.read_text()), str(path)
    elif store.head:
        data, source = store.metadata(store.head).get("config", {}), f"{run_dir} snapshot {store.head}"
    else:
        data, source = {}, ""
    # top-level sections this version does not know (written by another version) are dropped
    known = {f.name for f in dataclasses.fields(RunConfig)}
    data = apply_overrides({k: v for k, v in data.items() if k in known}, overrides)
    return from_dict(RunConfig, data, source=source)


def evaluate_run(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    attack: AttackConfig | None = None,
    model_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Re-evaluate an existing run: the base model and every snapshot of the head's chain (the
    applied requests, k = 1..K), through the run's evaluation cache (only snapshots never
    evaluated with these settings generate images), then rewrite ``run_dir/report`` (rows,
    grids, curves, HTML; grids of requests no longer in the chain are removed).

    ``overrides``: ``key=value`` changes to the run's config (``eval.*`` is what matters).
    ``attack``: also run the soft-prompt attack on every removed concept at the last snapshot
    (k = K), adding ``attack_success`` columns to its row (the run config's own attack setting,
    if any, applies at every k). Returns the rows.
    """
    import jax
    from flax import nnx

    from jaxforget.checkpoints import RunStore
    from jaxforget.engine import default_model_dir, flat_params, unflat_params
    from jaxforget.errors import JaxforgetError
    from jaxforget.io.diffusers_folder import folder_hash, load_model_folder
    from jaxforget.pipeline import DiffusionModel

    run_dir = Path(run_dir)
    store = RunStore.open(run_dir, create=False, lock=False)
    try:
        cfg = load_run_config_from_dir(run_dir, store, overrides)
        folder = Path(model_dir or cfg.model or store.base_model or default_model_dir())
        if folder_hash(folder) != store.base_hash:
            raise JaxforgetError(f"{run_dir}: made from base model {store.base_model!r} (hash {store.base_hash}); "
                                 f"{folder} differs: pass --model with the original model")
        dtype = jax.numpy.bfloat16 if cfg.compute_dtype == "bfloat16" else None
        model = DiffusionModel.from_folder(load_model_folder(folder, compute_dtype=dtype))
        base_state = nnx.split(model.unet)[1]
        run = _StoredRun(model, run_dir, store, base_state, store.base_hash)
        evaluator = RunEvaluator(cfg.eval, method=cfg.method, log=log)
        final_attack = attack_settings(cfg.eval, attack) if attack is not None else None
        report_dir = run_dir / "report"
        report_dir.mkdir(parents=True, exist_ok=True)

        rows = [evaluator.base_row(run, report_dir)]
        log(f"k=0 (base model): " + _fmt_row(rows[0]))
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
                    for k, v in flat_params(base_state).items()}
        chain = store.chain()
        removed: list[str] = []
        for k, sid in enumerate(chain, start=1):
            meta = store.metadata(sid)
            removed.append(meta["request"]["target"])
            state = unflat_params(base_state, store.snapshot_params(sid, abstract))
            row = evaluator.snapshot_row(run, k, sid, state, list(removed), report_dir,
                                         attack=final_attack if k == len(chain) else None)
            rows.append(row)
            log(f"k={k} '{removed[-1]}' (snapshot {sid}): " + _fmt_row(row))
        for p in list(report_dir.glob("grid_k*.png")) + list(report_dir.glob("attack_k*")):
            m = re.match(r"(grid|attack)_k(\d+)", p.stem)
            if m and int(m.group(2)) > len(chain):
                p.unlink()  # a request rolled back since: not part of this report
        page = write_report(report_dir, rows)
        log(f"report: {page}")
        return rows
    finally:
        store.close()


def _fmt_row(row: dict[str, Any]) -> str:
    keys = ("UA", "IRA", "CRA", "NRA", "ACC", "fid_proxy", "attack_success")
    parts = []
    for k in keys:
        v = row.get(k)
        if isinstance(v, (int, float)) and math.isfinite(v):
            parts.append(f"{k}={v:.3f}")
    return " ".join(parts)


__all__ = ["RunEvaluator", "make_evaluator", "eval_config", "attack_settings", "write_report", "load_rows",
           "evaluate_run", "load_run_config_from_dir"]
