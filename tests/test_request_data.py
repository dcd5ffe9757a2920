"""Request data sets (forget / mapped / retain / prior) are stored per request as one datasets
folder; sets differ in length, so each is its own split."""

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
