"""The continual engine on a tiny random SD-1 pipeline: snapshots and ledger, resume, rollback,
export (loaded by diffusers), crash safety (SIGKILL mid-request, same command again ->
bit-identical parameters), and every bad input -> one-line error, exit code 2, nothing written.

The toy-world quality figures (UA / retention) are in tests/test_toyworld_unlearning.py.
"""

from __future__ import annotations

import contextlib
import io

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxforget.cli import main
from tiny_pipelines import build_sd_folder

REPO = Path(__file__).resolve().parents[1]

# few steps, few images: the mechanics, not the quality
FAST = ["steps=4", "batch_size=8", "checkpoint_every=2", "eval.every=0", "data.forget_images=8",
        "data.retain_images=8", "data.prior_images=8", "data.num_inference_steps=2", "data.gen_batch_size=8",
        "data.retain_pool=[a photo of a tree, a blue car]", "trainable.filter=attn2", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "sd1"
    build_sd_folder(path, "sd1")
    return path


def _requests(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _unlearn(model_dir: Path, run_dir: Path, requests: Path, *extra: str) -> int:
    return main(["--concepts", str(requests), "--model", str(model_dir), "--run-dir", str(run_dir), *FAST, *extra],
                command="unlearn")


def _snapshot_params(run_dir: Path, snap: int) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = run_dir.parent / f"export-{run_dir.name}-{snap}"
    if not out.exists():
        assert main(["--run-dir", str(run_dir), "--step", str(snap), "--out", str(out)], command="export") == 0
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


# ----------------------------------------------------------------------------- the happy path
@pytest.fixture(scope="module")
def dfr_run(model_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dfr")
    req = _requests(root / "req.txt", "# two requests\ncat -> dog\nvan gogh -> painting | related: dog\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _unlearn(model_dir, root / "run", req) == 0
    (root / "stdout.txt").write_text(out.getvalue())
    return root / "run", req


def test_second_request_reuses_the_compiled_step(dfr_run):
    # both requests' steps are one program (request data are arguments): traced and compiled once
    log = (dfr_run[0].parent / "stdout.txt").read_text()
    assert log.count("train step compiled") == 1, log
    assert "request 2 'van gogh' -> 'painting': snapshot 2" in log


def test_duge_removed_set_replays_earlier_targets(model_dir, tmp_path):
    # duge.lambda_rm > 0: from the second request on, ε_prev's images of the earlier targets'
    # prompts join the batch (weight 1); the first request gets a zero-weight set of the same
    # shape, so both requests share one compiled step
    from jaxforget.engine import load_dataset_columns

    req = _requests(tmp_path / "req.txt", "cat -> dog\nvan gogh -> painting\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _unlearn(model_dir, tmp_path / "run", req, "method=duge", "duge.lambda_rm=1.0",
                        "data.removed_images=8") == 0
    log = out.getvalue()
    assert log.count("train step compiled") == 1 and "train step reused" in log, log
    folders = sorted((tmp_path / "run" / "data").glob("request-*"))
    assert len(folders) == 2, folders
    first, second = (load_dataset_columns(f) for f in folders)
    assert "removed_z0" not in first  # nothing removed yet: no images generated
    prompts = second["removed_prompt"]
    assert len(prompts) == 8 and all("cat" in p for p in prompts), prompts
    assert np.stack(second["removed_z0"]).shape[0] == 8

    from jaxforget.checkpoints import RunStore

    with RunStore.open(tmp_path / "run", create=False, lock=False) as store:
        assert store.metadata(1)["prompts"]["removed"] == []
        assert set(store.metadata(2)["prompts"]["removed"]) == set(prompts)


def test_snapshots_ledger_and_resume(dfr_run, model_dir, capsys):
    from jaxforget.checkpoints import RunStore

    run_dir, req = dfr_run
    store = RunStore.open(run_dir, create=False, lock=False)
    assert store.snapshot_ids() == [1, 2] and store.head == 2
    ledger = store.ledger()
    assert [e["request"]["target"] for e in ledger] == ["cat", "van gogh"]
    assert ledger[1]["parent"] == 1 and ledger[0]["parent"] == 0
    assert ledger[0]["request"]["anchor"] == "dog" and ledger[0]["method"] == "dfr"
    assert np.isfinite(ledger[1]["metrics"]["loss"])
    store.close()
    # the replay / anchor sets are stored per request as datasets folders
    assert len(list((run_dir / "data").glob("request-*"))) == 2
    # parameters changed, and request 2 started from request 1's result
    p1, p2 = _snapshot_params(run_dir, 1), _snapshot_params(run_dir, 2)
    from safetensors.numpy import load_file

    base = load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert not np.array_equal(p1[key], base[key]) and not np.array_equal(p2[key], p1[key])
    frozen = "conv_in.weight"  # not in the attn2 filter: untouched
    assert np.array_equal(p2[frozen], base[frozen])
    # the same command again: nothing to do, nothing rewritten
    capsys.readouterr()
    assert _unlearn(model_dir, run_dir, req) == 0
    assert "already applied" in capsys.readouterr().out


def test_rollback_keeps_later_snapshots_and_continues(dfr_run, model_dir, tmp_path):
    import shutil

    from jaxforget.checkpoints import RunStore

    src, req = dfr_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    assert main(["--run-dir", str(run_dir), "--to", "1"], command="rollback") == 0
    store = RunStore.open(run_dir, create=False, lock=False)
    assert store.head == 1 and store.snapshot_ids() == [1, 2]  # snapshot 2 kept
    store.close()
    assert _unlearn(model_dir, run_dir, req) == 0  # re-applies request 2 on top of snapshot 1
    store = RunStore.open(run_dir, create=False, lock=False)
    assert store.snapshot_ids() == [1, 2, 3] and store.head == 3
    assert store.metadata(3)["parent"] == 1
    assert [e["request"]["target"] for e in store.ledger()] == ["cat", "van gogh"]
    store.close()
    # deterministic: the re-applied request gives exactly snapshot 2's parameters
    a, b = _snapshot_params(run_dir, 2), _snapshot_params(run_dir, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # rollback to an unknown snapshot: one-line error, exit 2
    assert main(["--run-dir", str(run_dir), "--to", "9"], command="rollback") == 2


@pytest.mark.slow
def test_exported_snapshot_loads_in_diffusers(dfr_run):
    import torch
    from diffusers import StableDiffusionPipeline

    run_dir, _ = dfr_run
    params = _snapshot_params(run_dir, 2)
    out = run_dir.parent / f"export-{run_dir.name}-2"
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    got = pipe.unet.state_dict()[key].numpy()
    np.testing.assert_array_equal(got, params[key])
    with torch.no_grad():
        img = pipe("a photo of a cat", num_inference_steps=2, output_type="np").images
    assert img.shape[-1] == 3 and np.isfinite(img).all()


# ----------------------------------------------------------------------------- crash safety
@pytest.mark.slow
def test_sigkill_mid_request_then_same_command_is_bit_identical(model_dir, tmp_path):
    req = _requests(tmp_path / "req.txt", "cat -> dog\nred -> blue\n")
    extra = ["steps=10", "checkpoint_every=2"]
    # reference: uninterrupted
    assert _unlearn(model_dir, tmp_path / "ref", req, *extra) == 0
    # interrupted: SIGKILL once request 2 has written a step checkpoint
    run_dir = tmp_path / "crash"
    cmd = [sys.executable, str(REPO / "launch" / "tpu.py"), "--concepts", str(req), "--model", str(model_dir),
           "--run-dir", str(run_dir), *FAST, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            steps = [p for p in (run_dir / "steps").glob("1-1/*") if p.name.isdigit()] if (run_dir / "steps").exists() else []
            if steps:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    snaps_before = sorted(p.name for p in (run_dir / "snapshots").iterdir() if p.name.isdigit())
    assert snaps_before == ["1"]  # request 1 done, request 2 in flight
    assert _unlearn(model_dir, run_dir, req, *extra) == 0  # the same command again
    snaps_after = sorted(p.name for p in (run_dir / "snapshots").iterdir() if p.name.isdigit())
    assert snaps_after == ["1", "2"]
    for snap in (1, 2):
        a, b = _snapshot_params(tmp_path / "ref", snap), _snapshot_params(run_dir, snap)
        assert sorted(a) == sorted(b)
        assert all(np.array_equal(a[k], b[k]) for k in a), f"snapshot {snap} differs after resume"


# ----------------------------------------------------------------------------- bad input
def _assert_error(capsys, code: int, *needles: str) -> str:
    out = capsys.readouterr().err
    assert code == 2, out
    assert out.count("error: ") == 1, out
    err = out[out.index("error: "):].strip()  # (progress bars may precede it on stderr)
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize(
    "text, needles",
    [
        ("", ("no requests",)),
        ("# only a comment\n", ("no requests",)),
        ("cat\ncat -> dog | bogus: 1\n", (":2", "bogus")),
        ("cat\ndog\ncat -> tree\n", (":3", "duplicate target 'cat'")),
        ("cat -> cat\n", (":1", "anchor equals the target")),
        ("-> dog\n", (":1",)),
        ("cat | domain: colour\n", (":1", "domain")),
    ],
)
def test_bad_requests_file(model_dir, tmp_path, capsys, text, needles):
    req = _requests(tmp_path / "req.txt", text)
    code = _unlearn(model_dir, tmp_path / "run", req)
    _assert_error(capsys, code, str(req), *needles)
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_requests_file(model_dir, tmp_path, capsys):
    code = _unlearn(model_dir, tmp_path / "run", tmp_path / "nope.txt")
    _assert_error(capsys, code, "nope.txt", "not found")
    assert not (tmp_path / "run").exists()


def test_target_beyond_77_tokens(model_dir, tmp_path, capsys):
    # (a target that tokenizes to nothing: CLIP's byte-level BPE encodes every non-space
    # character, so tests/test_requests.py checks that rule with a tokenizer that drops some)
    req = _requests(tmp_path / "req.txt", "cat\n" + "cat " * 80 + "dog\n")
    _assert_error(capsys, _unlearn(model_dir, tmp_path / "run", req), ":2", "beyond 77")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, needles",
    [
        ("stepz=3", ("stepz",)),
        ("steps=three", ("steps", "integer")),
        ("dfr.lambda_q=1", ("lambda_q",)),
        ("method=magic", ("magic",)),
        ("optim.lr=fast", ("optim.lr", "number")),
    ],
)
def test_bad_config(model_dir, tmp_path, capsys, override, needles):
    req = _requests(tmp_path / "req.txt", "cat\n")
    _assert_error(capsys, _unlearn(model_dir, tmp_path / "run", req, override), *needles)
    assert not (tmp_path / "run").exists()


def test_bad_config_file_names_file_and_line(model_dir, tmp_path, capsys):
    req = _requests(tmp_path / "req.txt", "cat\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: dfr\nsteps: 3\ndfr:\n  lambda_p: lots\n")
    code = main(["--concepts", str(req), "--config", str(cfg), "--model", str(model_dir),
                 "--run-dir", str(tmp_path / "run")], command="unlearn")
    _assert_error(capsys, code, "run.yaml:4", "lambda_p")


def test_target_already_removed_per_ledger(dfr_run, model_dir, tmp_path, capsys):
    import shutil

    src, _ = dfr_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    before = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*"))
    req = _requests(tmp_path / "more.txt", "red\ncat -> tree\n")  # a new file repeating 'cat'
    _assert_error(capsys, _unlearn(model_dir, run_dir, req), "more.txt:2", "already removed")
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == before


def test_resume_with_a_different_base_model(dfr_run, tmp_path, capsys):
    import shutil

    src, req = dfr_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    other = tmp_path / "other"
    build_sd_folder(other, "sd1", seed=7)
    before = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*"))
    err = _assert_error(capsys, _unlearn(other, run_dir, req), str(run_dir))
    assert "hash" in err or "base model" in err
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == before


def test_nan_loss_stops_the_request_and_keeps_snapshots(dfr_run, model_dir, tmp_path, capsys):
    import shutil

    src, _ = dfr_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    req = _requests(tmp_path / "req.txt", "cat -> dog\nvan gogh -> painting | related: dog\nred\n")
    code = _unlearn(model_dir, run_dir, req, "dfr.lambda_u=.nan")
    _assert_error(capsys, code, "request 3", "'red'", "step 1", "snapshot 2 kept")
    from jaxforget.checkpoints import RunStore

    store = RunStore.open(run_dir, create=False, lock=False)
    assert store.snapshot_ids() == [1, 2] and store.head == 2
    assert store.failures()[-1]["request_index"] == 2
    store.close()


# ----------------------------------------------------------------------------- CPU compile options
class _TanhLoss:
    """A stand-in method: tanh(x @ w), which XLA:CPU's defaults (jaxlib 0.10) fuse with YNNPACK."""

    def loss(self, params, frozen, batch, rng):
        import jax.numpy as jnp

        y = jnp.tanh(batch["x"] @ params["w"]) * 2.0 + 1.0
        loss = jnp.mean(jnp.square(y))
        return loss, {"loss": loss}


def test_train_step_compiles_with_the_cpu_options():
    import jax
    import jax.numpy as jnp
    import optax

    from jaxforget import distributed as DIST
    from jaxforget import engine as E
    from jaxforget.methods import regularizers as REG

    assert jax.default_backend() == "cpu"
    assert DIST.runtime_compiler_options() == DIST.RUNTIME_CPU_OPTIONS
    tx = optax.adam(1e-3)
    params = {"w": jnp.full((64, 64), 0.01, jnp.float32)}
    batch = {"x": jnp.ones((64, 64), jnp.float32)}
    step = E.make_train_step(_TanhLoss(), None, REG.Config(), tx, ["w"])
    args = (params, tx.init(params), None, batch, jax.random.PRNGKey(0))
    tuned = step.lower(*args).compile().as_text()
    assert "__ynn_fusion" not in tuned
    if jax.__version__.startswith("0.10."):  # the jaxlib the option was measured on (NOTES.md)
        # the option is what removes them: the same step with XLA's defaults has some
        default = jax.jit(step.__wrapped__).lower(*args).compile().as_text()
        assert "__ynn_fusion" in default
    new_params, _, metrics = step(*args)
    assert np.isfinite(float(metrics["loss"])) and float(jnp.abs(new_params["w"] - 0.01).max()) > 0


def test_runtime_jit_builds_one_program_with_the_runtime_options():
    """Module-level programs (sampler, soft-prompt attack) go through ``runtime_jit``: one jit,
    built on first call, compiled with the runtime XLA options, same values as plain jax.jit."""
    import jax
    import jax.numpy as jnp

    from jaxforget import distributed as DIST

    traces = []

    def f(x, *, scale):
        traces.append(1)
        return jnp.tanh(x @ x) * scale + 1.0

    fast = DIST.runtime_jit(f, static_argnames=("scale",))
    assert fast.__name__ == "f" and fast.program() is fast.program()
    x = jnp.full((64, 64), 0.01, jnp.float32)
    got = fast(x, scale=2.0)
    fast(x + 1.0, scale=2.0)
    assert len(traces) == 1  # traced once for both calls
    plain = jax.jit(f, static_argnames=("scale",))
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain(x, scale=2.0)), rtol=1e-6)
    assert "__ynn_fusion" not in fast.program().lower(x, scale=2.0).compile().as_text()
    if jax.__version__.startswith("0.10."):  # the jaxlib the option was measured on (NOTES.md)
        assert "__ynn_fusion" in plain.lower(x, scale=2.0).compile().as_text()


def test_unknown_cpu_option_falls_back_to_xla_defaults(monkeypatch):
    from jaxforget import distributed as DIST

    monkeypatch.setattr(DIST, "RUNTIME_CPU_OPTIONS", {"xla_cpu_no_such_option_anywhere": True})
    assert DIST.runtime_compiler_options() is None
