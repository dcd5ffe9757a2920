"""Toy world: renderer, prompt grammar, concept catalogue, its tokenizer, and the shipped judge."""

from __future__ import annotations

import numpy as np
import pytest

from jaxforget.errors import CheckpointFormatError, ConfigError
from jaxforget.toyworld import catalogue as C
from jaxforget.toyworld import render as R

# ----------------------------------------------------------------------------- renderer


def test_render_deterministic_and_seeded():
    a = R.render("circle", "dots", "red", 7)
    b = R.render("circle", "dots", "red", 7)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes()
    others = [R.render("circle", "dots", "red", s) for s in range(8, 16)]
    assert all(o.tobytes() != a.tobytes() for o in others)
    # unspecified style / colour come from the seed, deterministically
    assert R.render("star", None, None, 3).tobytes() == R.render("star", None, None, 3).tobytes()
    assert R.render(None, "grid", None, 3).shape == (32, 32, 3)
    assert R.render("heart", "waves", "blue", 5, size=48).shape == (48, 48, 3)


def _object_region(obj, style, colour, seed):
    """Pixels the object changes (same seed without object = same background)."""
    with_obj = R.render(obj, style, colour, seed).astype(int)
    without = R.render(None, style, colour, seed).astype(int)
    return with_obj, without, np.abs(with_obj - without).sum(-1) > 0


@pytest.mark.parametrize("obj", R.OBJECTS)
def test_every_object_on_every_style(obj):
    for j, style in enumerate(R.STYLES):
        colour = R.COLOUR_NAMES[j % len(R.COLOUR_NAMES)]
        img, bg, changed = _object_region(obj, style, colour, 100 + j)
        frac = changed.mean()
        assert 0.08 < frac < 0.75, (obj, style, frac)  # drawn, and not the whole frame
        # the object stays inside the frame: the 1-px border is background (mostly)
        border = np.concatenate([changed[0], changed[-1], changed[:, 0], changed[:, -1]])
        assert border.mean() < 0.1, (obj, style)
        # same seed, another object: the background far from both objects is identical
        other = R.render("square" if obj != "square" else "circle", style, colour, 100 + j)
        _, _, changed2 = _object_region("square" if obj != "square" else "circle", style, colour, 100 + j)
        far = ~changed & ~changed2
        assert np.array_equal(img[far], other[far].astype(int))


@pytest.mark.parametrize("colour", R.COLOUR_NAMES)
def test_objects_stand_out_even_on_plain_backgrounds(colour):
    # worst case for visibility: a uniform background, every colour, many palettes
    worst = np.inf
    for seed in range(40):
        img, bg, changed = _object_region("square", "plain", colour, seed)
        inner = changed & (np.abs(img - bg).sum(-1) > 0)
        # mean RGB distance (0..441) between the object's core and the background colour
        dist = np.linalg.norm(img[inner].mean(0) - bg[~changed].mean(0))
        worst = min(worst, dist)
    assert worst > 90, (colour, worst)


def test_near_neighbours_differ():
    # same seed: circle / ellipse / ring and the stripe directions must give different pictures
    imgs = {o: R.render(o, "plain", "red", 11) for o in ("circle", "ellipse", "ring")}
    for a in imgs:
        for b in imgs:
            if a < b:
                assert np.abs(imgs[a].astype(int) - imgs[b].astype(int)).sum(-1).astype(bool).mean() > 0.1
    h = R.render(None, "horizontal stripes", None, 4).astype(float).mean(-1)
    v = R.render(None, "vertical stripes", None, 4).astype(float).mean(-1)
    # horizontal stripes vary along y only, vertical along x only
    assert h.std(axis=1).max() < 1e-6 and h.std(axis=0).max() > 20
    assert v.std(axis=0).max() < 1e-6 and v.std(axis=1).max() > 20


def test_render_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown object"):
        R.render("hexagon", "dots", "red", 0)
    with pytest.raises(ValueError, match="unknown style"):
        R.render("circle", "stripes", "red", 0)
    with pytest.raises(ValueError, match="unknown colour"):
        R.render("circle", "dots", "teal", 0)
    with pytest.raises(ValueError):
        R.render("circle", "dots", "red", -1)


def test_example_grid():
    grid = R.example_grid(scale=1)
    assert grid.shape == (10 * 34, 10 * 34, 3)


# ----------------------------------------------------------------------------- catalogue


def test_catalogue_consistent():
    cat = C.load_catalogue()
    assert set(cat.objects) == set(R.OBJECTS) and len(cat.objects) >= 10
    assert set(cat.styles) == set(R.STYLES) and len(cat.styles) >= 10
    assert set(cat.colours) <= set(R.COLOUR_NAMES)
    names = {c.name for c in cat.concepts}
    for c in cat.concepts:
        assert c.domain in ("object", "style")
        assert c.neighbours, c.name
        for n in c.neighbours:
            assert n in names and cat.concept(n).domain == c.domain and n != c.name
        assert len(c.eval_prompts) >= 4
        other = "style" if c.domain == "object" else "object"
        mixed = 0
        for p in c.eval_prompts:
            labels = C.parse_prompt(p, cat)
            assert labels.get(c.domain) == c.name, (c.name, p)
            assert f" {c.name} " in f" {p} "
            mixed += labels.get(other) is not None
        assert mixed >= 3, c.name  # evaluation prompts mix in the other domain
    # the declared near neighbours the benchmark relies on
    assert {"ellipse", "ring"} <= set(cat.concept("circle").neighbours)
    assert "vertical stripes" in cat.concept("horizontal stripes").neighbours


def test_catalogue_validation_errors(tmp_path):
    src = C.CATALOGUE_PATH.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("neighbours: [ellipse, ring]", "neighbours: [ellipse, oval]", 1))
    with pytest.raises(ConfigError, match="neighbour 'oval'"):
        C.load_catalogue(bad)
    bad.write_text(src.replace("      - a circle on gradient background\n", "      - a square on gradient background\n", 1))
    with pytest.raises(ConfigError, match="does not ask for 'circle'"):
        C.load_catalogue(bad)
    bad.write_text("concepts: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load_catalogue(bad)


def test_parse_prompt():
    p = C.parse_prompt("A Red  circle on horizontal stripes background")
    assert p == C.Labels(object="circle", style="horizontal stripes", colour="red")
    assert C.parse_prompt("a star") == C.Labels(object="star")
    assert C.parse_prompt("an empty grid background") == C.Labels(style="grid", empty=True)
    assert C.parse_prompt("a ring") == C.Labels(object="ring")
    assert C.parse_prompt("strings, rings and dotted lines") == C.Labels()  # whole words only
    assert C.parse_prompt("A circle, on DOTS background!") == C.Labels(object="circle", style="dots")
    with pytest.raises(ValueError, match="2 objects"):
        C.parse_prompt("a circle and a square")
    with pytest.raises(ValueError, match="empty"):
        C.parse_prompt("an empty circle")


def test_make_prompt_round_trip_and_sampling():
    cat = C.load_catalogue()
    examples = C.sample_examples(400, seed=3)
    assert [e.prompt for e in examples] == [e.prompt for e in C.sample_examples(400, seed=3)]
    kinds = set()
    for e in examples:
        assert C.parse_prompt(e.prompt, cat) == e.labels
        # the scene agrees with everything the prompt says
        if e.labels.object:
            assert e.spec.obj == e.labels.object
        if e.labels.style:
            assert e.spec.style == e.labels.style
        if e.labels.colour:
            assert e.spec.colour == e.labels.colour
        if e.labels.empty:
            assert e.spec.obj is None
        assert 0 <= e.spec.seed < R.EVAL_SEED_BASE
        kinds.add((e.labels.object is not None, e.labels.style is not None, e.labels.colour is not None,
                   e.labels.empty))
    assert len(kinds) >= 5  # all prompt shapes occur
    for labels in (C.Labels(object="arrow", colour="orange"), C.Labels(style="dots"), C.Labels(empty=True),
                   C.Labels(object="ellipse", style="vertical stripes")):
        for t in range(4):
            text = C.make_prompt(labels, t, cat)
            assert C.parse_prompt(text, cat) == labels, text
            assert " a a" not in f" {text}" and " a e" not in f" {text}" and " a o" not in f" {text}"
    with pytest.raises(ValueError):
        C.make_prompt(C.Labels(colour="red"))


def test_eval_examples_use_held_out_seeds():
    ex = C.eval_examples("circle", 3)
    assert len(ex) == 3 * len(C.load_catalogue().concept("circle").eval_prompts)
    assert all(e.spec.obj == "circle" and e.spec.seed >= R.EVAL_SEED_BASE for e in ex)
    assert ex == C.eval_examples("circle", 3)


def test_world_tokenizer(tmp_path):
    from jaxforget.tokenizers import encode_prompts, load_clip_tokenizer, token_span_positions

    tok = load_clip_tokenizer(C.build_toyworld_tokenizer(tmp_path))
    for word in C.iter_words():
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    cat = C.load_catalogue()
    for c in cat.concepts:
        n = len(tok(c.name, add_special_tokens=False)["input_ids"])
        assert n == len(c.name.split()) <= 2
        ids = encode_prompts(tok, list(c.eval_prompts))
        for row in ids:
            assert len(token_span_positions(tok, row, c.name)) == n, c.name


# ----------------------------------------------------------------------------- judge


@pytest.fixture(scope="module")
def judge():
    from jaxforget.toyworld.judge import load_judge

    return load_judge()


def test_shipped_judge_accuracy(judge):
    """>= 95 % per head on fresh renders with seeds never used in training (>= EVAL_SEED_BASE)."""
    from jaxforget.toyworld.judge import HEADS, judge_predict, make_batch

    rng = np.random.default_rng(20240601)
    low = R.EVAL_SEED_BASE + 500_000_000  # a held-out range evaluate_judge does not use either
    images, targets = make_batch(rng, 300, judge.config, p_empty=0.08, seed_low=low, seed_high=low + 10**8)
    pred = judge_predict(judge, images)
    for head in HEADS:
        valid = targets[head] >= 0
        acc = (pred[f"{head}_logits"].argmax(-1)[valid] == targets[head][valid]).mean()
        assert acc >= 0.95, (head, acc)
    assert pred["features"].shape == (300, judge.config.feature_dim)
    np.testing.assert_allclose(pred["object_probs"].sum(-1), 1.0, rtol=1e-5)


def test_shipped_judge_files_small_and_recorded():
    from jaxforget.toyworld.judge import DEFAULT_JUDGE_DIR, judge_record

    size = sum(p.stat().st_size for p in DEFAULT_JUDGE_DIR.iterdir())
    assert size < 1_000_000, size
    record = judge_record()
    assert min(record["accuracy"].values()) >= 0.98, record


def test_judge_input_ranges(judge):
    from jaxforget.toyworld.judge import judge_predict, predicted_names

    img = np.stack([R.render("ring", "checker", "green", R.EVAL_SEED_BASE + i) for i in range(4)])
    a = judge_predict(judge, img)
    b = judge_predict(judge, img.astype(np.float32) / 127.5 - 1.0, value_range=(-1.0, 1.0))
    np.testing.assert_allclose(a["object_logits"], b["object_logits"], atol=1e-4)
    names = predicted_names(judge, a)
    assert names["object"] == ["ring"] * 4 and names["style"] == ["checker"] * 4 and names["colour"] == ["green"] * 4
    with pytest.raises(ValueError):
        judge_predict(judge, img[0])


def test_judge_save_load_round_trip(tmp_path):
    from jaxforget.toyworld.judge import JudgeConfig, init_judge, judge_predict, load_judge, save_judge

    cfg = JudgeConfig(stem_channels=4, channels=(8, 8, 8), feature_dim=16)
    model = init_judge(cfg, seed=1)
    save_judge(model, tmp_path / "j32", record={"note": "tiny"}, dtype=np.float32)
    save_judge(model, tmp_path / "j", record={"note": "tiny"})  # float16 weights (default)
    loaded = load_judge(tmp_path / "j32")
    assert loaded.config == cfg
    img = R.render_batch(R.random_specs(np.random.default_rng(0), 5))
    ref = judge_predict(model, img)
    for k, v in ref.items():
        np.testing.assert_array_equal(v, judge_predict(loaded, img)[k])  # exact in float32
    half = judge_predict(load_judge(tmp_path / "j"), img)
    for k, v in ref.items():
        np.testing.assert_allclose(v, half[k], rtol=2e-2, atol=2e-3)  # float16 storage
    with pytest.raises(CheckpointFormatError, match="missing config.json"):
        load_judge(tmp_path / "nothing")
    (tmp_path / "j" / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointFormatError):
        load_judge(tmp_path / "j")


def test_train_judge_is_deterministic():
    import jax
    from flax import nnx

    from jaxforget.toyworld.judge import JudgeConfig, train_judge

    cfg = JudgeConfig(stem_channels=4, channels=(8, 8, 8), feature_dim=16)
    steps_seen = []
    a = train_judge(3, seed=5, batch_size=8, config=cfg, log_every=2, callback=lambda s, m: steps_seen.append(s))
    b = train_judge(3, seed=5, batch_size=8, config=cfg, log_every=2)
    c = train_judge(3, seed=6, batch_size=8, config=cfg, log_every=2)
    assert steps_seen == [1, 2, 3] and [h["step"] for h in a.history] == [2, 3]
    assert a.history == b.history and a.history != c.history
    pa, pb = (jax.tree.leaves(nnx.state(r.model, nnx.Param)) for r in (a, b))
    assert len(pa) == len(pb) > 0 and all(np.array_equal(x, y) for x, y in zip(pa, pb))
