"""Request data sets (forget / mapped / retain / prior) are stored per request as one datasets
folder; sets differ in length, so each is its own split."""

import dataclasses

import numpy as np

from jaxforget.engine import load_dataset_columns, save_dataset


def test_sets_of_different_lengths_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    cols = {
        "forget_z0": rng.standard_normal((3, 2, 2, 4)).astype(np.float32),
        "forget_prompt": ["a circle", "a picture of a circle", "a circle"],
        "retain_z0": rng.standard_normal((5, 2, 2, 4)).astype(np.float32),
        "retain_prompt": [f"p{i}" for i in range(5)],
    }
    folder = tmp_path / "request-001"
    save_dataset(folder, cols)
    back = load_dataset_columns(folder)
    assert set(back) == set(cols)
    for k, v in cols.items():
        got = np.stack(back[k]) if k.endswith("_z0") else list(back[k])
        if k.endswith("_z0"):
            np.testing.assert_array_equal(got.astype(np.float32), v)
        else:
            assert got == v
    # rewriting is atomic: the old folder is replaced, no temporary left behind
    save_dataset(folder, {"forget_prompt": ["x"]})
    assert list(load_dataset_columns(folder)) == ["forget_prompt"]
    assert not (tmp_path / "request-001.tmp").exists()


def test_removed_prompts_cover_every_earlier_target_round_robin():
    # the removed set is cycled from the front of this list: interleaving the earlier requests
    # keeps every earlier target in a set smaller than the list; the current target is excluded
    from jaxforget.engine import DataConfig, request_prompts
    from jaxforget.requests import Request

    cfg = DataConfig(templates=("a {}", "a red {}", "{} on grid"))
    earlier = [Request(target=t) for t in ("circle", "star", "heart")]
    pr = request_prompts(Request(target="grid"), cfg, ["circle", "star", "heart"], "plain", earlier)
    assert pr.removed == ["a circle", "a star", "a heart", "a red circle", "a red star", "a red heart"]
    assert all(any(t in p for p in pr.removed[:3]) for t in ("circle", "star", "heart"))
    assert request_prompts(Request(target="grid"), cfg, [], "plain").removed == []


def test_retain_earlier_anchors_joins_the_replay_set():
    # data.retain_earlier_anchors: the earlier requests' anchors, in their own templates, come
    # right after the target's related concepts (so a cycled replay set reaches them first); an
    # anchor that is itself removed stays out, and the DUGE prior set is unchanged
    from jaxforget.engine import DataConfig, request_prompts
    from jaxforget.requests import Request

    cfg = DataConfig(templates=("a {}", "a red {}"), retain_pool=("a tree",),
                     domain_templates={"style": ("{} background",)}, retain_earlier_anchors=True)
    earlier = [Request(target="circle", anchor="square"), Request(target="dots", anchor="plain", domain="style"),
               Request(target="star", anchor="circle")]
    req = Request(target="arrow", anchor="square", related=("triangle",))
    pr = request_prompts(req, cfg, ["circle", "dots", "star"], "square", earlier)
    assert pr.retain == ["a triangle", "a red triangle", "a square", "a red square", "plain background", "a tree"]
    assert pr.prior == ["a triangle", "a red triangle"]
    off = request_prompts(req, dataclasses.replace(cfg, retain_earlier_anchors=False), ["circle", "dots", "star"],
                          "square", earlier)
    assert off.retain == ["a triangle", "a red triangle", "a tree"]
