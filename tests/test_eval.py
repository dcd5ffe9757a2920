"""Evaluation: metrics on hand-made cases, the toy-world judge on renders, evaluate_model on a
tiny random SD pipeline (determinism, batching independence, cache), and the reports."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from jaxforget.errors import ConfigError
from jaxforget.eval import evaluate as E
from jaxforget.eval import report as R
from jaxforget.eval.judges import Judge, ToyWorldJudge, load_judge
from jaxforget.eval.metrics import cmmd, continual_metrics, frechet_distance
from jaxforget.toyworld.catalogue import eval_examples, load_catalogue
from jaxforget.toyworld.render import render_batch

CAT = load_catalogue()


# ----------------------------------------------------------------------------- Fréchet distance
def test_frechet_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(400, 6)) @ np.random.default_rng(1).normal(size=(6, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_two_samples_of_one_gaussian_is_small():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(20000, 4)), rng.normal(size=(20000, 4))
    assert frechet_distance(a, b) < 5e-3  # sampling noise only (vs 1.0 for a unit mean shift)


def test_frechet_shifted_means_is_squared_shift():
    x = np.random.default_rng(3).normal(size=(300, 5))
    delta = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    # same covariance exactly, so the trace term is 0 and FD = ‖Δμ‖² = 14.25
    assert frechet_distance(x, x + delta) == pytest.approx(float(delta @ delta), rel=1e-9)


def test_frechet_scaled_1d_gaussian_closed_form():
    a = np.random.default_rng(4).normal(size=(500, 1))
    a = (a - a.mean()) / a.std(ddof=1)  # mean 0, variance exactly 1
    # N(0, 1) vs N(3, 4): (3 - 0)² + (1 - 2)² = 10
    assert frechet_distance(a, 2.0 * a + 3.0) == pytest.approx(10.0, rel=1e-9)


def test_frechet_matches_scipy_sqrtm_and_survives_rank_deficiency():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) * 1.5 + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * scipy_linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    # 10 samples of 32 features: singular covariances; still finite, >= 0, and 0 for equal sets
    small, other = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 1.0
    d = frechet_distance(small, other)
    assert math.isfinite(d) and d > 32 * 0.5
    assert frechet_distance(small, small) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        frechet_distance(small[:1], other)


# ----------------------------------------------------------------------------- CMMD
def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cmmd_matches_unbiased_definition():
    rng = np.random.default_rng(6)
    x, y, s = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) + 1.0, 2.0
    k = lambda a, b: math.exp(-np.sum((a - b) ** 2) / (2 * s * s))  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert cmmd(x, y, sigma=s) == pytest.approx(1000 * (xx + yy - 2 * xy), rel=1e-9)
    assert cmmd(x, y, sigma=s, scale=1.0) * 1000 == pytest.approx(cmmd(x, y, sigma=s), rel=1e-12)


def test_cmmd_zero_for_same_distribution_positive_for_different():
    rng = np.random.default_rng(7)
    centre_a, centre_b = np.eye(16)[0] * 3, np.eye(16)[1] * 3
    a1 = _unit(rng.normal(size=(300, 16)) + centre_a)
    a2 = _unit(rng.normal(size=(300, 16)) + centre_a)
    b = _unit(rng.normal(size=(300, 16)) + centre_b)
    different = cmmd(a1, b)
    assert different > 1.0
    assert abs(cmmd(a1, a2)) < 0.02 * different
    assert abs(cmmd(a1, a1)) < 0.02 * different  # identical sets: only the U-statistic's tiny offset


# ----------------------------------------------------------------------------- continual metrics
DOMAINS = {"object": ("a", "b", "c", "d"), "style": ("x", "y", "z")}
NEIGHBOURS = {"a": ("b",), "b": ("a", "c"), "x": ("y",)}
DETECTION = {"a": 0.1, "b": 0.2, "c": 0.8, "d": 0.6, "x": 0.0, "y": 0.9, "z": 0.7}


def test_continual_metrics_hand_made():
    m = continual_metrics(DETECTION, [("a", "object"), ("x", "style"), ("b", "object")], ("b", "object"),
                          domains=DOMAINS, neighbours=NEIGHBOURS)
    assert m["UA"] == pytest.approx(1 - (0.1 + 0.0 + 0.2) / 3)  # 0.9: every removed target so far
    assert m["IRA"] == pytest.approx((0.8 + 0.6) / 2)  # c, d: objects not removed
    assert m["CRA"] == pytest.approx((0.9 + 0.7) / 2)  # y, z: styles not removed
    assert m["NRA"] == pytest.approx((0.9 + 0.8) / 2)  # y (of x), c (of b); a, b are removed
    assert m["ACC"] == pytest.approx((0.8 + 0.6 + 0.9 + 0.7) / 4)


def test_continual_metrics_current_counts_as_removed():
    m = continual_metrics(DETECTION, [("a", "object")], ("x", "style"), domains=DOMAINS, neighbours=NEIGHBOURS)
    assert m["UA"] == pytest.approx(1 - (0.1 + 0.0) / 2)
    assert m["IRA"] == pytest.approx((0.9 + 0.7) / 2)  # y, z
    assert m["CRA"] == pytest.approx((0.2 + 0.8 + 0.6) / 3)  # b, c, d
    assert m["NRA"] == pytest.approx((0.2 + 0.9) / 2)  # b (of a), y (of x)


def test_continual_metrics_empty_sets_are_nan():
    base = continual_metrics(DETECTION, [], None, domains=DOMAINS, neighbours=NEIGHBOURS)
    assert all(math.isnan(base[k]) for k in ("UA", "IRA", "CRA", "NRA"))
    assert base["ACC"] == pytest.approx(np.mean(list(DETECTION.values())))
    m = continual_metrics({"a": 0.0, "b": 0.5}, [("a", "object"), ("b", "object")], ("b", "object"),
                          domains={"object": ("a", "b")}, neighbours={"a": ("b",), "b": ("a",)})
    assert m["UA"] == pytest.approx(0.75)
    assert math.isnan(m["IRA"]) and math.isnan(m["CRA"]) and math.isnan(m["NRA"]) and math.isnan(m["ACC"])
    with pytest.raises(ValueError, match="no detection"):
        continual_metrics({"b": 1.0}, [("a", "object")], ("a", "object"), domains=DOMAINS)
    with pytest.raises(ValueError, match="not a 'style'"):
        continual_metrics(DETECTION, [("a", "style")], ("a", "style"), domains=DOMAINS)


def test_continual_metrics_on_catalogue():
    det = {c.name: 1.0 for c in CAT.concepts} | {"circle": 0.25, "ellipse": 0.5, "dots": 0.0}
    m = continual_metrics(det, [("circle", "object")], ("circle", "object"), CAT)
    assert m["UA"] == pytest.approx(0.75)
    assert m["IRA"] == pytest.approx((8 + 0.5) / 9)  # 9 other objects
    assert m["CRA"] == pytest.approx(9 / 10)  # styles, dots at 0
    assert m["NRA"] == pytest.approx((0.5 + 1.0) / 2)  # ellipse, ring


# ----------------------------------------------------------------------------- toy-world judge
@pytest.fixture(scope="module")
def toy_judge():
    return load_judge("toyworld")


def test_load_judge_specs(toy_judge):
    assert isinstance(toy_judge, ToyWorldJudge) and isinstance(toy_judge, Judge)
    assert toy_judge.name.startswith("toyworld:") and toy_judge.image_size == 32
    assert set(toy_judge.concept_names("object")) == set(CAT.objects)
    assert set(toy_judge.concept_names("style")) == set(CAT.styles)
    with pytest.raises(ConfigError):
        load_judge("nope:x")
    with pytest.raises(ConfigError):
        load_judge("clip:")


@pytest.mark.parametrize("concept", ["circle", "ellipse", "star", "dots", "horizontal stripes", "gradient"])
def test_toy_judge_detects_renders(toy_judge, concept):
    c = CAT.concept(concept)
    ex = eval_examples(c, 2, CAT)
    images = render_batch([e.spec for e in ex]).astype(np.float32) / 255.0
    assert toy_judge.detect(images, concept, c.domain).mean() >= 0.9
    # a larger image of the same scenes (as a bigger model would produce) is resized and still read
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
    assert toy_judge.detect(big, concept, c.domain).mean() >= 0.9
    # the same images do not show an unrelated concept of the domain
    other = next(n for n in CAT.objects + CAT.styles if CAT.concept(n).domain == c.domain
                 and n != concept and n not in c.neighbours)
    assert toy_judge.detect(images, other, c.domain).mean() <= 0.1
    feats = toy_judge.features(images)
    assert feats.shape == (len(ex), toy_judge.config.feature_dim) and np.all(np.isfinite(feats))


def test_toy_judge_alignment(toy_judge):
    ex = [e for c in ("circle", "star", "dots") for e in eval_examples(c, 2, CAT)]
    images = render_batch([e.spec for e in ex]).astype(np.float32) / 255.0
    prompts = [e.prompt for e in ex]
    score = toy_judge.alignment(images, prompts)
    assert score.shape == (len(ex),) and np.mean(score == 1.0) >= 0.9
    # scored against other prompts (rotated by one concept's worth), alignment drops
    shifted = prompts[10:] + prompts[:10]
    assert np.nanmean(toy_judge.alignment(images, shifted)) < 0.7
    # "an empty background" names only "empty": a scene with an object fails it
    assert toy_judge.alignment(images[:1], ["an empty background"])[0] == 0.0


# ----------------------------------------------------------------------------- evaluate_model
class PixelJudge:
    """Stand-in judge on pixel statistics (the tiny model's 16 px images mean nothing to the toy
    judge): a concept is "present" when its channel (a hash of its name) is brighter than the
    image's mean."""

    name = "pixel-stats-v1"
    feature_kind = "pixel"

    def concept_names(self, domain):
        return tuple(c.name for c in CAT.concepts if c.domain == domain)

    def detect(self, images, concept, domain):
        ch = sum(map(ord, concept)) % 3
        return images[..., ch].mean(axis=(1, 2)) > images.mean(axis=(1, 2, 3))

    def features(self, images):
        coarse = images[:, ::4, ::4, 0].reshape(len(images), -1)
        return np.concatenate([images.mean(axis=(1, 2)), images.std(axis=(1, 2)), coarse], -1)

    def alignment(self, images, prompts):
        return (images.mean(axis=(1, 2, 3)) > 0.5).astype(np.float32)


CFG = E.EvalConfig(images_per_prompt=3, prompts_per_concept=2, num_inference_steps=2, batch_size=8,
                   concepts=("circle", "ring", "plain", "dots"), fid_reference_images=0, grid_columns=3)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny_pipelines import build_sd_folder

    from jaxforget.io.diffusers_folder import load_model_folder
    from jaxforget.pipeline import DiffusionModel

    folder = build_sd_folder(tmp_path_factory.mktemp("eval") / "sd1", "sd1")
    return DiffusionModel.from_folder(load_model_folder(folder))


@pytest.fixture(scope="module")
def first_eval(tiny_model):
    return E.evaluate_model(tiny_model, PixelJudge(), CAT, removed=[("circle", "object")],
                            current=("circle", "object"), cfg=CFG)


def _rows_by_prompt(result, n):
    return {p: result.features[i * n:(i + 1) * n] for i, p in enumerate(result.prompts)}


def test_evaluate_model_runs_and_is_deterministic(tiny_model, first_eval):
    r = first_eval
    # 8 distinct prompts (no overlap among these 4 concepts' first two) x 3 seeds
    assert r.num_images == 24 and len(r.prompts) == 8 and r.features.shape[0] == 24
    assert set(r.detection) == set(CFG.concepts)
    assert all(0.0 <= v <= 1.0 for v in r.detection.values())
    for c, rates in r.per_prompt.items():
        assert len(rates) == 2 and r.detection[c] == pytest.approx(np.mean(list(rates.values())))
    assert {k for k in ("UA", "IRA", "CRA", "NRA", "ACC", "alignment")} <= set(r.metrics)
    assert r.metrics["UA"] == pytest.approx(1.0 - r.detection["circle"])
    assert r.metrics["IRA"] == pytest.approx(r.detection["ring"])  # the only other object evaluated
    assert r.metrics["CRA"] == pytest.approx((r.detection["plain"] + r.detection["dots"]) / 2)
    assert r.metrics["NRA"] == pytest.approx(r.detection["ring"])  # ellipse is not evaluated
    assert math.isnan(r.metrics["fid_proxy"])  # references off in CFG
    assert {c: v.shape for c, v in r.images.items()} == {c: (3, 16, 16, 3) for c in CFG.concepts}
    assert r.images["circle"].dtype == np.uint8 and not r.from_cache
    assert len({p for p in r.prompts}) == 8 and r.images["circle"].std() > 0  # seeds differ

    again = E.evaluate_model(tiny_model, PixelJudge(), CAT, removed=[("circle", "object")],
                             current=("circle", "object"), cfg=CFG)
    np.testing.assert_array_equal(again.features, r.features)
    assert again.detection == r.detection and again.per_prompt == r.per_prompt
    # a snapshot's UNet state in place of the model's own UNet: same params, same images
    from flax import nnx

    snap = E.evaluate_model(tiny_model, PixelJudge(), CAT, cfg=CFG, unet_state=nnx.state(tiny_model.unet))
    np.testing.assert_array_equal(snap.features, r.features)

    # Fewer concepts: the same (prompt, seed) pairs land in other batches and batch positions
    # (same batch size, so no new compile) and must give the same images.
    sub = E.evaluate_model(tiny_model, PixelJudge(), CAT, removed=[], current=None,
                           cfg=dataclasses.replace(CFG, concepts=("dots", "ring")))
    assert sub.prompts[0] == "dots background" and sub.num_images == 12
    full, part = _rows_by_prompt(r, 3), _rows_by_prompt(sub, 3)
    for p in part:
        np.testing.assert_allclose(part[p], full[p], atol=1e-5)  # tolerance: XLA op order only
    assert np.abs(sub.images["ring"].astype(int) - r.images["ring"].astype(int)).max() <= 1
    for c in ("dots", "ring"):
        assert sub.detection[c] == r.detection[c]


def test_evaluate_model_cache(tiny_model, first_eval, tmp_path, monkeypatch):
    calls = []
    real = E._generate_jit

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(E, "_generate_jit", counting)
    kw = dict(removed=[("circle", "object")], current=("circle", "object"), cfg=CFG, cache_dir=tmp_path,
              cache_key="snapshot-abc")
    r1 = E.evaluate_model(tiny_model, PixelJudge(), CAT, **kw)
    assert len(calls) == 3 and not r1.from_cache  # 24 images / batches of 8
    np.testing.assert_array_equal(r1.features, first_eval.features)
    r2 = E.evaluate_model(tiny_model, PixelJudge(), CAT, **kw)
    assert len(calls) == 3 and r2.from_cache and r2.cache_path == r1.cache_path
    assert r2.detection == r1.detection and r2.alignment == r1.alignment
    np.testing.assert_array_equal(r2.features, r1.features)
    for c in CFG.concepts:
        np.testing.assert_array_equal(r2.images[c], r1.images[c])
    for k, v in r1.metrics.items():
        assert (math.isnan(v) and math.isnan(r2.metrics[k])) or r2.metrics[k] == v
    # cached judging, new request state: metrics recomputed, still no generation
    r3 = E.evaluate_model(tiny_model, PixelJudge(), CAT, **{**kw, "removed": [], "current": None})
    assert len(calls) == 3 and r3.from_cache and math.isnan(r3.metrics["UA"])
    # a CLIP-feature judge (same name, so same entry) also gets CMMD against the given reference
    clip_like = type("ClipLike", (PixelJudge,), {"feature_kind": "clip"})()
    r4 = E.evaluate_model(tiny_model, clip_like, CAT, **kw, reference=r1.features)
    assert r4.from_cache and "cmmd" in r4.metrics and "cmmd" not in r1.metrics
    # both sides are the retained prompts' rows (circle's prompts left out), so the sets are
    # identical: only the U-statistic's offset 2000·(mean off-diagonal kernel − 1)/N remains
    kept, kept_ref = E.retained_features(r1.features, clip_like, CAT, CFG, ["circle"], reference=r1.features)
    n = len(kept)
    assert 1 < n < 24 and np.array_equal(kept, kept_ref)
    f = kept.astype(np.float64)
    d2 = ((f[:, None] - f[None]) ** 2).sum(-1)
    offdiag = (np.exp(-d2 / 200).sum() - n) / (n * (n - 1))
    assert r4.metrics["cmmd"] == pytest.approx(2000 * (offdiag - 1) / n, rel=1e-6)
    assert r4.metrics["fid_proxy"] == pytest.approx(0.0, abs=1e-6)
    # another eval config or another key is another entry
    E.evaluate_model(tiny_model, PixelJudge(), CAT, **{**kw, "cache_key": "snapshot-def"})
    assert len(calls) == 6


def test_evaluate_model_with_toy_judge_and_reference(tiny_model, toy_judge, tmp_path):
    """The real judge on the tiny model's 16 px images (resized to 32) and the FID proxy
    against rendered references; the reference features are cached on disk."""
    cfg = dataclasses.replace(CFG, fid_reference_images=24)
    r = E.evaluate_model(tiny_model, toy_judge, CAT, removed=[("dots", "style")], current=("dots", "style"),
                         cfg=cfg, cache_dir=tmp_path, cache_key="k")
    assert r.features.shape == (24, toy_judge.config.feature_dim)
    assert math.isfinite(r.metrics["fid_proxy"]) and r.metrics["fid_proxy"] > 0
    assert 0.0 <= r.metrics["alignment"] <= 1.0
    assert len(list(tmp_path.glob("reference-*.npy"))) == 1
    # against its own features as the reference, the distance vanishes
    same = E.evaluate_model(tiny_model, toy_judge, CAT, cfg=cfg, cache_dir=tmp_path, cache_key="k",
                            reference=r.features)
    assert same.from_cache and same.metrics["fid_proxy"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_model_survives_nan_images(tiny_model, monkeypatch):
    real = E._generate_jit

    def nan_first_batch(*args, **kw):
        out = real(*args, **kw)
        return out._replace(images=out.images * np.nan) if not calls else out

    calls = []
    monkeypatch.setattr(E, "_generate_jit", lambda *a, **k: (nan_first_batch(*a, **k), calls.append(1))[0])
    r = E.evaluate_model(tiny_model, PixelJudge(), CAT, cfg=CFG)
    assert r.info["nonfinite_images"] == 8 and np.all(np.isfinite(r.features))
    assert all(math.isfinite(v) for v in r.detection.values())


# ----------------------------------------------------------------------------- reports
def test_reports(first_eval, tmp_path):
    r = first_eval
    grid = R.concept_grid(r.images, [("circle", "object")], tmp_path / "grid_k1.png", title="k=1: circle")
    img = np.asarray(Image.open(grid).convert("RGB"))
    # rows x cols tiles at 4x (16 px -> 64 px) plus labels and a title band
    assert img.shape[0] >= 4 * 64 and img.shape[1] >= 3 * 64
    assert ((img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)).sum() > 100  # red marks

    base = continual_metrics(r.detection, [], None, CAT)
    rows = []
    for method, shift in (("dfr", 0.0), ("finetune", 0.2)):
        rows.append({"method": method, "k": 0, "target": "", **base, "fid_proxy": 1.0, "alignment": 0.9})
        for k in (1, 2):
            rows.append({"method": method, "k": k, "target": "circle", **r.metrics, "fid_proxy": 1.0 + k * shift,
                         "IRA": 0.9 - k * shift, "alignment": 0.9})
    curves = R.plot_curves(rows, tmp_path / "curves.png")
    assert Image.open(curves).size[0] > 400
    json_path, csv_path = R.write_metrics(rows, tmp_path)
    loaded = json.loads(json_path.read_text())
    assert len(loaded) == 6 and loaded[0]["UA"] is None and loaded[2]["IRA"] == pytest.approx(0.9 - 2 * 0.0)
    with open(csv_path) as fh:
        table = list(csv.DictReader(fh))
    assert table[0]["method"] == "dfr" and table[0]["UA"] == "" and float(table[5]["IRA"]) == pytest.approx(0.5)
    assert list(table[0])[:3] == ["method", "k", "target"]

    page = R.write_html_report(tmp_path, rows, {"request 1 (circle)": grid, "raw": r.images["ring"]})
    text = page.read_text()
    blobs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(blobs) == 3  # curves + 2 images, all embedded
    decoded = Image.open(io.BytesIO(base64.b64decode(blobs[1])))
    assert decoded.size == Image.open(grid).size
    assert "request 1 (circle)" in text and "finetune" in text and "<table>" in text
    assert (tmp_path / "curves.png").is_file() and "src=\"" + str(tmp_path) not in text  # no file links


# ----------------------------------------------------------------------------- attack settings of the hook
def test_hook_attack_settings_follow_the_evaluation_sampler():
    from jaxforget.engine import EvalHook
    from jaxforget.eval.attack import AttackConfig
    from jaxforget.eval.hook import attack_settings

    hook = EvalHook(num_inference_steps=7, guidance_scale=2.5, sampler="euler")
    assert attack_settings(hook) is None  # no attack field (or disabled): off
    assert attack_settings(hook, AttackConfig(steps=5)) is None  # enabled defaults to False
    got = attack_settings(hook, AttackConfig(enabled=True, steps=5))
    assert (got.steps, got.num_inference_steps, got.guidance_scale, got.sampler) == (5, 7, 2.5, "euler")
    # the digest (cache identity) follows the sampling actually used
    assert got.digest() != AttackConfig(enabled=True, steps=5).digest()


def test_detection_table_tracks_each_concept_over_requests(tmp_path):
    rows = [
        {"k": 0, "target": "", "method": "dfr", "UA": float("nan"), "detection": {"circle": 1.0, "ring": 0.9, "dots": 0.8}},
        {"k": 1, "target": "circle", "method": "dfr", "UA": 1.0, "detection": {"circle": 0.0, "ring": 0.7, "dots": 0.85}},
        {"k": 2, "target": "dots", "method": "dfr", "UA": 0.95, "detection": {"circle": 0.05, "ring": 0.8, "dots": 0.05}},
    ]
    table = {r["concept"]: r for r in R.detection_table(rows)}
    assert table["circle"]["removed_at_k"] == 1 and table["dots"]["removed_at_k"] == 2
    assert table["ring"]["removed_at_k"] == "" and table["ring"]["k=1"] == 0.7
    # drops count only before the concept's own removal: circle's fall to 0 is the goal, not a drop
    assert table["circle"]["max_drop"] == 0.0
    assert table["ring"]["max_drop"] == pytest.approx(0.2)
    assert table["dots"]["max_drop"] == 0.0  # k = 0 counts (no drop); it only rose before removal
    R.write_metrics(rows, tmp_path)
    with open(tmp_path / "metrics_detection.csv") as fh:
        written = {r["concept"]: r for r in csv.DictReader(fh)}
    assert written["ring"]["k=2"] == "0.8" and written["ring"]["max_drop"] == "0.2"
    with open(tmp_path / "metrics.csv") as fh:
        assert "detection" not in next(csv.reader(fh))  # its own table, not a JSON cell
    page = R.write_html_report(tmp_path, rows, {}).read_text()
    assert "Judge detection per concept" in page and "max_drop" in page
    assert R.detection_table([{"k": 0, "UA": 1.0}]) == []


def test_fid_proxy_leaves_out_the_removed_concepts_prompts(tiny_model, first_eval):
    # first_eval removed circle: its prompts ("... circle ...") are not in the FID sets
    plan = E._plan(CAT, CFG)
    n = CFG.images_per_prompt
    feats, _ = E.retained_features(first_eval.features, PixelJudge(), CAT, CFG, ["circle"])
    kept = [p for p in plan.unique if "circle" not in plan.users[p] and "circle" not in p]
    assert 0 < len(kept) < len(plan.unique) and feats.shape[0] == len(kept) * n
    rows = [i for i, p in enumerate(plan.unique) if p in kept]
    np.testing.assert_array_equal(feats, np.concatenate([first_eval.features[i * n:(i + 1) * n] for i in rows]))
    # nothing removed: every prompt; a given aligned reference is cut to the same rows
    all_feats, _ = E.retained_features(first_eval.features, PixelJudge(), CAT, CFG, [])
    assert all_feats.shape == first_eval.features.shape
    ref = first_eval.features + 1.0
    f2, r2 = E.retained_features(first_eval.features, PixelJudge(), CAT, CFG, ["circle"], reference=ref)
    np.testing.assert_array_equal(r2, f2 + 1.0)
