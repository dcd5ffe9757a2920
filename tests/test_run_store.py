"""RunStore: snapshots per request, ledger, rollback, step checkpoints, failures, and the
"nothing is lost" guarantees (no overwrite, killed saves ignored, base-model mismatch refused
before anything is written). Tiny pytrees; round trips are compared bit for bit."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxforget.checkpoints import RunStateError, RunStore, StepCheckpointer, tree_params_hash
from jaxforget.errors import JaxforgetError
from jaxforget.io.diffusers_folder import params_hash
from jaxforget.models.layers import Linear
from jaxforget.requests import Request

BASE = "0123456789abcdef"


def make_tree(seed: int) -> dict:
    """params (fp32 + bf16, an int-keyed list like nnx.List) and a stepped adam state."""
    rng = np.random.default_rng(seed)
    params = {
        "conv_in": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal(8), jnp.float32)},
        "down_blocks": {0: {"norm": {"scale": jnp.asarray(rng.standard_normal(8), jnp.bfloat16)}},
                        1: {"proj": {"kernel": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)}}},
    }
    opt = optax.adam(1e-3)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
    _, state = opt.update(grads, state, params)
    return {"params": params, "opt_state": state, "reg": None}


def meta(i: int, target: str | None = None) -> dict:
    return {"request": {"target": target or f"concept{i}"}, "request_index": i,
            "config": {"lr": 1e-5, "method": "dfr"}, "metrics": {"loss": 0.5 + i}}


def listing(root: Path) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        out[dirpath] = None
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return out


def assert_bit_identical(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.fixture
def store(tmp_path):
    s = RunStore.open(tmp_path / "run", base_model="tiny-sd", base_hash=BASE)
    yield s
    s.close()


def test_create_and_reopen(tmp_path):
    run = tmp_path / "run"
    with RunStore.open(run, base_model="tiny-sd", base_hash=BASE) as s:
        assert s.head == 0 and s.snapshot_ids() == [] and s.ledger() == []
        info = json.loads((run / "run.json").read_text())
        assert info["base_hash"] == BASE and info["base_model"] == "tiny-sd"
        assert {"created", "jaxforget_version", "format"} <= set(info)
        sid = s.save_snapshot(make_tree(0), meta(0))
    with RunStore.open(run, base_model="tiny-sd", base_hash=BASE, create=False) as s:
        assert s.head == sid == 1 and s.base_hash == BASE
    with RunStore.open(run, create=False) as s:  # no hash: export / rollback of an existing run
        assert s.head == 1 and s.run_info["base_model"] == "tiny-sd"
        s.save_run_config({"method": "dfr", "steps": (1, 2)})
        assert json.loads((run / "config.json").read_text()) == {"method": "dfr", "steps": [1, 2]}


def test_open_refuses_missing_and_foreign_dirs(tmp_path):
    with pytest.raises(RunStateError, match="not a jaxforget run directory"):
        RunStore.open(tmp_path / "nope", base_hash=BASE, create=False)
    assert not (tmp_path / "nope").exists()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.txt").write_text("keep me")
    before = listing(foreign)
    with pytest.raises(RunStateError, match="refusing to write"):
        RunStore.open(foreign, base_hash=BASE)
    assert listing(foreign) == before


def test_base_hash_mismatch_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with RunStore.open(run, base_model="sd15", base_hash=BASE) as s:
        s.save_snapshot(make_tree(0), meta(0))
    before = listing(run)
    with pytest.raises(RunStateError) as e:
        RunStore.open(run, base_model="other-model", base_hash="fedcba9876543210")
    msg = str(e.value)
    assert BASE in msg and "fedcba9876543210" in msg and str(run) in msg and "\n" not in msg
    assert isinstance(e.value, JaxforgetError) and e.value.exit_code == 2
    assert listing(run) == before


def test_round_trip_bit_identical(tmp_path):
    run = tmp_path / "run"
    tree = make_tree(1)
    with RunStore.open(run, base_hash=BASE) as s:
        sid = s.save_snapshot(tree, meta(0))
    with RunStore.open(run, base_hash=BASE) as s:  # a fresh process would see the same
        abstract = {k: (None if v is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, v))
                    for k, v in tree.items()}
        out, m = s.load_snapshot(sid, abstract)
        assert_bit_identical(out["params"], tree["params"])
        assert_bit_identical(out["opt_state"], tree["opt_state"])  # namedtuples of optax come back as such
        assert isinstance(out["opt_state"][0], optax.ScaleByAdamState)
        assert out["reg"] is None and int(out["opt_state"][0].count) == 1
        assert 0 in out["params"]["down_blocks"]  # int keys (nnx.List) survive
        assert_bit_identical(s.snapshot_params(sid, tree["params"]), tree["params"])
        assert m["id"] == sid and m["parent"] == 0 and m["base_hash"] == BASE and m["request_index"] == 0
        assert m["items"] == ["opt_state", "params"]
        assert m["params_hash"] == tree_params_hash(tree["params"])
        assert m["config"] == {"lr": 1e-5, "method": "dfr"} and m["metrics"] == {"loss": 0.5}
        with pytest.raises(RunStateError, match="no reg"):
            s.load_snapshot(sid, {"reg": {"a": jnp.zeros(2)}})


def test_params_hash_matches_io_params_hash():
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Linear(4, 8, rngs=rngs), Linear(8, 4, rngs=rngs)])
            self.out = Linear(4, 2, use_bias=False, rngs=rngs)

    m = Tiny(nnx.Rngs(0))
    assert tree_params_hash(nnx.to_pure_dict(nnx.state(m, nnx.Param))) == params_hash(m)


def test_metadata_is_plain_json(store):
    req = Request(target="van gogh", anchor="painting", related=("monet",), line=3)
    sid = store.save_snapshot(make_tree(0), {"request": req, "request_index": np.int64(2),
                                             "metrics": {"loss": np.float32(0.25), "bad": float("nan")}})
    m = store.metadata(sid)
    assert m["request"]["target"] == "van gogh" and m["request"]["related"] == ["monet"]
    assert m["request_index"] == 2 and m["metrics"] == {"loss": 0.25, "bad": "nan"}
    raw = (store.run_dir / "snapshots" / str(sid) / "metadata" / "metadata").read_text()
    assert json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))["id"] == sid


def test_ids_increase_and_never_overwrite(store, monkeypatch):
    ids = [store.save_snapshot(make_tree(i), meta(i)) for i in range(3)]
    assert ids == [1, 2, 3] and store.snapshot_ids() == [1, 2, 3]
    before = listing(store.run_dir / "snapshots" / "2")
    # make the store believe id 2 is free: Orbax's own check must still refuse to write it
    monkeypatch.setattr(store, "_last_id", 1)
    monkeypatch.setattr(store, "snapshot_ids", lambda: [1])
    with pytest.raises(RunStateError, match="refusing to overwrite"):
        store.save_snapshot(make_tree(9), meta(9))
    monkeypatch.undo()
    assert listing(store.run_dir / "snapshots" / "2") == before
    assert store.metadata(2)["request_index"] == 1 and store.head == 3


def test_ledger_is_the_parent_chain(store):
    for i in range(3):
        store.save_snapshot(make_tree(i), meta(i, target=["cat", "dog", "van gogh"][i]))
    led = store.ledger()
    assert [m["id"] for m in led] == [1, 2, 3]
    assert [m["parent"] for m in led] == [0, 1, 2]
    assert [m["request_index"] for m in led] == [0, 1, 2]
    assert store.applied_targets() == ["cat", "dog", "van gogh"]
    assert store.chain(2) == [1, 2]


def test_rollback_keeps_later_snapshots(tmp_path):
    run = tmp_path / "run"
    with RunStore.open(run, base_hash=BASE) as s:
        for i in range(3):
            s.save_snapshot(make_tree(i), meta(i))
        assert s.rollback(1) == []
        assert s.head == 1 and s.snapshot_ids() == [1, 2, 3]
        assert [m["id"] for m in s.ledger()] == [1]
        sid = s.save_snapshot(make_tree(7), meta(1, target="other"))
        assert sid == 4 and s.metadata(4)["parent"] == 1
        assert s.chain() == [1, 4] and s.applied_targets() == ["concept0", "other"]
    with RunStore.open(run, base_hash=BASE) as s:
        assert s.head == 4 and s.snapshot_ids() == [1, 2, 3, 4]
        s.rollback(3)  # the kept branch is still reachable
        assert s.chain() == [1, 2, 3]
        out, _ = s.load_snapshot(3, {"params": make_tree(2)["params"]})
        assert_bit_identical(out["params"], make_tree(2)["params"])
        s.rollback(0)
        assert s.head == 0 and s.ledger() == [] and s.snapshot_ids() == [1, 2, 3, 4]
        assert s.save_snapshot(make_tree(5), meta(0)) == 5 and s.metadata(5)["parent"] == 0


def test_rollback_delete_later(tmp_path):
    run = tmp_path / "run"
    with RunStore.open(run, base_hash=BASE) as s:
        for i in range(3):
            s.save_snapshot(make_tree(i), meta(i))
        s.step_checkpointer(3, every=1).close()  # an unfinished request on top of 3
        assert (run / "steps" / "3-3").is_dir()
        assert s.rollback(1, delete_later=True) == [2, 3]
        assert s.snapshot_ids() == [1] and s.head == 1
        assert not (run / "snapshots" / "2").exists() and not (run / "steps" / "3-3").exists()
        assert s.save_snapshot(make_tree(8), meta(1)) == 4  # deleted ids are not reused
    with RunStore.open(run, base_hash=BASE) as s:
        assert s.snapshot_ids() == [1, 4] and s.chain() == [1, 4]


def test_rollback_to_unknown_id(store):
    store.save_snapshot(make_tree(0), meta(0))
    head_json = (store.run_dir / "head.json").read_text()
    with pytest.raises(RunStateError, match=r"no snapshot 7 \(snapshots: 1; 0 = base model\)"):
        store.rollback(7)
    assert store.head == 1 and (store.run_dir / "head.json").read_text() == head_json
    with pytest.raises(RunStateError, match="base model"):
        store.load_snapshot(0, {"params": make_tree(0)["params"]})


def test_step_checkpointer_per_parent_and_request(tmp_path):
    run = tmp_path / "run"
    tree = make_tree(3)
    with RunStore.open(run, base_hash=BASE) as s:
        ck = s.step_checkpointer(0, every=5)
        assert isinstance(ck, StepCheckpointer) and ck.directory == run / "steps" / "0-0"
        assert ck.maybe_save(5, tree) and not ck.maybe_save(6, tree)
        ck.close()
    with RunStore.open(run, base_hash=BASE) as s:  # the same command again resumes the request
        ck = s.step_checkpointer(0, every=5)
        step, restored = ck.restore(tree)
        assert step == 5
        assert_bit_identical(restored["params"], tree["params"])
        ck.close()
        s.save_snapshot(tree, meta(0))  # the snapshot supersedes the step checkpoints
        assert not (run / "steps" / "0-0").exists()
        assert s.step_dir(1) == run / "steps" / "1-1"
        ck = s.step_checkpointer(1, every=1)
        ck.maybe_save(3, tree)
        ck.close()
        s.rollback(0)
        # after a rollback the same request index is a different in-progress request
        ck = s.step_checkpointer(1, every=1)
        assert ck.directory == run / "steps" / "0-1" and ck.restore(tree) is None
        ck.close()
        assert (run / "steps" / "1-1").is_dir()  # kept: rolling forward to 1 again resumes it


def test_failure_record(store):
    sid = store.save_snapshot(make_tree(0), meta(0))
    snap = listing(store.run_dir / "snapshots")
    e = store.record_failure(1, 17, "loss is nan")
    assert e["request_index"] == 1 and e["step"] == 17 and e["parent"] == sid
    store.record_failure(1, 3, "loss is inf")
    assert [f["message"] for f in store.failures()] == ["loss is nan", "loss is inf"]
    assert store.head == sid and listing(store.run_dir / "snapshots") == snap
    failed = json.loads((store.run_dir / "failed.json").read_text())
    assert failed["failures"][0]["step"] == 17


def test_killed_save_is_ignored_on_reopen(tmp_path):
    run = tmp_path / "run"
    with RunStore.open(run, base_hash=BASE) as s:
        s.save_snapshot(make_tree(0), meta(0))
    # what a process killed during Orbax's save of snapshot 2 leaves behind
    tmp = run / "snapshots" / "2.orbax-checkpoint-tmp"
    (tmp / "params.orbax-checkpoint-tmp").mkdir(parents=True)
    (tmp / "params.orbax-checkpoint-tmp" / "half").write_bytes(b"\0" * 100)
    with RunStore.open(run, base_hash=BASE) as s:
        assert s.snapshot_ids() == [1] and s.head == 1
        assert s.save_snapshot(make_tree(1), meta(1)) == 2
        out, m = s.load_snapshot(2, {"params": make_tree(1)["params"]})
        assert_bit_identical(out["params"], make_tree(1)["params"]) and m["parent"] == 1
    assert sorted(os.listdir(run / "snapshots")) == ["1", "2"]


def test_bad_tree_is_refused_before_writing(store):
    store.save_snapshot(make_tree(0), meta(0))
    before = listing(store.run_dir)
    bad = make_tree(1)
    bad["opt_state"] = {"x": object()}  # Orbax would fail part-way through the save
    with pytest.raises(TypeError, match=r"\['opt_state'\]\['x'\]"):
        store.save_snapshot(bad, meta(1))
    assert listing(store.run_dir) == before and store.head == 1
    assert store.save_snapshot(make_tree(1), meta(1)) == 2


def test_snapshot_written_but_head_not_moved_is_adopted(tmp_path):
    run = tmp_path / "run"
    with RunStore.open(run, base_hash=BASE) as s:
        s.save_snapshot(make_tree(0), meta(0))
        s.save_snapshot(make_tree(1), meta(1))
    # killed between the snapshot commit and the head.json update of snapshot 2
    (run / "head.json").write_text(json.dumps({"head": 1, "last_id": 1}))
    with RunStore.open(run, base_hash=BASE) as s:
        assert s.head == 2 and s.chain() == [1, 2]
        s.rollback(1)
    with RunStore.open(run, base_hash=BASE) as s:  # a kept later snapshot is not re-adopted
        assert s.head == 1 and s.snapshot_ids() == [1, 2]


def test_second_writer_is_refused(tmp_path):
    run = tmp_path / "run"
    with RunStore.open(run, base_hash=BASE):
        with pytest.raises(RunStateError, match="in use"):
            RunStore.open(run, base_hash=BASE)
    RunStore.open(run, base_hash=BASE).close()


def test_sharded_restore(store):
    assert len(jax.devices()) >= 8, "conftest must simulate 8 CPU devices"
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    tree = make_tree(4)
    sid = store.save_snapshot(tree, meta(0))
    spec = {"conv_in": {"kernel": P(None, None, "fsdp", "tensor"), "bias": P("tensor")},
            "down_blocks": {0: {"norm": {"scale": P("fsdp")}}, 1: {"proj": {"kernel": P("fsdp", "tensor")}}}}
    abstract = jax.tree.map(lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, p)),
                            tree["params"], spec)
    params = store.snapshot_params(sid, abstract)
    assert params["conv_in"]["kernel"].sharding == NamedSharding(mesh, spec["conv_in"]["kernel"])
    assert len(params["conv_in"]["kernel"].addressable_shards) == 8
    assert_bit_identical(params, tree["params"])


def test_replicated_arrays_split_across_replicas_only_when_large(store, monkeypatch):
    # Orbax's replica-parallel save slices each replicated array across replicas (one eager op
    # per slice): kept for arrays whose slices reach MIN_REPLICA_SLICE_BYTES, skipped below
    from orbax.checkpoint._src.serialization import replica_slices as RS

    from jaxforget.checkpoints import MIN_REPLICA_SLICE_BYTES

    seen = {}
    real = RS.get_replica_slices

    def spy(arr, *a, **k):
        out = real(arr, *a, **k)
        seen[arr.shape] = [r.slice_args for r in out.replica_slices]
        return out

    monkeypatch.setattr(RS, "get_replica_slices", spy)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    rep = NamedSharding(mesh, P())
    rows = 8 * MIN_REPLICA_SLICE_BYTES // (4 * 64)  # fp32 rows of 64: slices of exactly the threshold
    tree = {"params": {"small": jax.device_put(jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64), rep),
                       "large": jax.device_put(jnp.ones((rows, 64), jnp.float32), rep)}}
    sid = store.save_snapshot(tree, meta(0))
    assert seen[(64, 64)] == [None]  # one whole copy from one replica
    assert len(seen[(rows, 64)]) == 8 and all(s is not None for s in seen[(rows, 64)])
    back = store.snapshot_params(sid, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                                   tree["params"]))
    assert_bit_identical(back, tree["params"])
