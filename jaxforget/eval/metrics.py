"""Benchmark metrics, pure numpy: the Fréchet distance (FID proxy), CMMD, and the continual
unlearning scores UA / IRA / CRA / NRA of benchmark.md.

Nothing here knows about models or judges: the evaluator passes feature matrices and
per-concept detection rates, so the same functions score the toy world and real models.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

CONTINUAL_METRICS = ("UA", "IRA", "CRA", "NRA", "ACC")


# ----------------------------------------------------------------------------- Fréchet distance
def _mean_cov(feats: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected features [N, F], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name}: a covariance needs >= 2 samples, got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: features contain NaN or inf")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, F] and [M, F]:

        ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)

    FID computes tr((Σ_a Σ_b)^½) with ``scipy.linalg.sqrtm`` of the (non-symmetric) product,
    which goes complex or NaN when the covariances are singular, as they are whenever N < F
    (e.g. 40 images, 128 features). Here it is tr((Σ_a^½ Σ_b Σ_a^½)^½): the same number (the
    two matrices are similar), but the inner matrix is symmetric PSD, so two ``eigh`` calls give
    a real, stable result for any rank. Computed in float64; the result is clipped at 0.

    The value depends on the sample sizes (a biased estimator, like FID): compare numbers
    computed with the same N and M only.
    """
    mu_a, cov_a = _mean_cov(feats_a, "feats_a")
    mu_b, cov_b = _mean_cov(feats_b, "feats_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    sa = _psd_sqrt(cov_a)
    inner = sa @ cov_b @ sa
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(value, 0.0)


# ----------------------------------------------------------------------------- CMMD
def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD (Jayasumana et al., CVPR 2024): MMD² between two embedding sets [N, F], [M, F]
    with the Gaussian RBF kernel k(a, b) = exp(−‖a − b‖² / (2σ²)), σ = 10, times ``scale`` (1000).

    Unbiased estimator (U-statistic): the within-set means leave out the diagonal, so the value
    is ~0 (and can be slightly negative) for two samples of the same distribution. The paper's
    reference code averages the full kernel matrices instead (a V-statistic with a small
    positive bias of order 1/N). Inputs are meant to be L2-normalized CLIP image embeddings, as
    in the paper (σ = 10 is tuned for those); they are not normalized here.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected embeddings [N, F] and [M, F], got {a.shape} and {b.shape}")
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        raise ValueError(f"the unbiased MMD needs >= 2 samples per set, got {n} and {m}")
    gamma = 1.0 / (2.0 * sigma * sigma)
    k_xx = np.exp(-gamma * _sq_dists(a, a))
    k_yy = np.exp(-gamma * _sq_dists(b, b))
    k_xy = np.exp(-gamma * _sq_dists(a, b))
    mmd = (
        (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
        + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        - 2.0 * k_xy.mean()
    )
    return float(scale * mmd)


# ----------------------------------------------------------------------------- continual scores
def concept_space(catalogue: Any) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """(domain -> concept names, concept -> declared neighbours) from any catalogue whose
    ``.concepts`` have ``name``, ``domain`` and ``neighbours`` (the toy world's Catalogue)."""
    domains: dict[str, list[str]] = {}
    neighbours: dict[str, tuple[str, ...]] = {}
    for c in catalogue.concepts:
        domains.setdefault(c.domain, []).append(c.name)
        neighbours[c.name] = tuple(c.neighbours)
    return {d: tuple(v) for d, v in domains.items()}, neighbours


def _mean_over(detection: Mapping[str, float], names: Iterable[str]) -> float:
    vals = [float(detection[n]) for n in names if n in detection]
    return float(np.mean(vals)) if vals else math.nan


def continual_metrics(
    detection: Mapping[str, float],
    removed: Sequence[tuple[str, str]],
    current: tuple[str, str] | None,
    catalogue: Any = None,
    *,
    domains: Mapping[str, Sequence[str]] | None = None,
    neighbours: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, float]:
    """UA, IRA, CRA, NRA (benchmark.md) and ACC after request k, from per-concept detection rates.

    ``detection[c]``: the fraction of images generated for concept c's evaluation prompts in
    which the judge finds c. ``removed``: (concept, domain) of requests 1..k in order; the
    current request ``current`` (its target, domain) is counted as removed even when the caller
    left it out of ``removed``. The concept space comes from ``catalogue`` (see
    ``concept_space``) or from explicit ``domains`` (domain -> names) and ``neighbours``.

    - UA  = 1 − mean detection over all removed targets (cumulative: forgotten stays forgotten).
    - IRA = mean detection over the not-removed concepts of the current target's domain.
    - CRA = mean detection over the not-removed concepts of every other domain.
    - NRA = mean detection over the declared neighbours of all removed targets, minus those
      that are themselves removed.
    - ACC = mean detection over all not-removed concepts (the only retention score at k = 0).

    Every mean gives each concept equal weight. Edge cases: an empty set gives NaN, never 0
    (no removed target yet: UA NaN; ``current`` None: IRA and CRA NaN; every neighbour already
    removed: NRA NaN). Retention sets count only concepts present in ``detection`` (an
    evaluation restricted to some concepts scores those); a removed target missing from
    ``detection`` is an error, since UA would silently drop it.

    The "× base" targets of benchmark.md compare like with like: call this again with the base
    model's detection and the same ``removed`` / ``current``.
    """
    if catalogue is not None:
        domains, neighbours = concept_space(catalogue)
    if domains is None:
        raise ValueError("continual_metrics needs a catalogue or explicit domains")
    neighbours = neighbours or {}
    domain_of = {n: d for d, names in domains.items() for n in names}

    targets: list[tuple[str, str]] = list(removed)
    if current is not None and tuple(current) not in [tuple(t) for t in targets]:
        targets.append(tuple(current))
    for name, dom in targets:
        if domain_of.get(name) != dom:
            raise ValueError(f"removed concept {name!r} is not a {dom!r} concept of the catalogue")
        if name not in detection:
            raise ValueError(f"no detection rate for removed concept {name!r}")
    gone = {name for name, _ in targets}

    out = {"UA": 1.0 - _mean_over(detection, (n for n, _ in targets)) if targets else math.nan}
    if current is None:
        out["IRA"] = out["CRA"] = math.nan
    else:
        cur_dom = current[1]
        out["IRA"] = _mean_over(detection, (n for n in domains[cur_dom] if n not in gone))
        out["CRA"] = _mean_over(
            detection, (n for d, names in domains.items() if d != cur_dom for n in names if n not in gone)
        )
    near: list[str] = []
    for name, _ in targets:
        near += [n for n in neighbours.get(name, ()) if n not in gone and n not in near]
    out["NRA"] = _mean_over(detection, near)
    out["ACC"] = _mean_over(detection, (n for names in domains.values() for n in names if n not in gone))
    return out


__all__ = ["CONTINUAL_METRICS", "frechet_distance", "cmmd", "concept_space", "continual_metrics"]
