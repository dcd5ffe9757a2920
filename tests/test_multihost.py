"""A real multi-process run with JAX's own runtime: ``launch/tpu.py`` on 2 processes on localhost
(coordinator 127.0.0.1:<free port>, 4 simulated CPU devices each, gloo CPU collectives) against
the same config in one process on 8 devices.

Mesh fsdp=8 over all devices, so parameters, Adam moments and batches are sharded across both
processes: the step's all-gathers / reduce-scatters cross the process boundary, step
checkpoints and snapshots are collective Orbax saves of arrays no process holds in full, and
request 2 restores request 1's snapshot onto the global mesh.

Tolerance: not bit-identical. Cross-process sums go through gloo's all-reduce, whose summation
order differs from the in-process CPU collectives (checked on its own: a sum over 8 devices equals
numpy's rank-order sum bit for bit in one process, and differs from it in the last bits over
2 × 4 gloo ranks), so teacher latents differ by fp32 rounding
(measured max 3e-6 on values up to 8) and the trained attn2 weights by ~1e-5 after 4 AdamW steps
at lr 1e-3 (Adam's normalized update turns ulp-level gradient differences into small weight
differences). We require max |θ_2proc − θ_1proc| ≤ 1e-4 on every parameter while the training
itself moved the weights by > 1e-3 (a wrong shard, a duplicated or dropped batch row shows at that
scale), untrained parameters bit-identical, and the same logged losses.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_engine import FAST, REPO, _snapshot_params, _unlearn
from tiny_pipelines import build_sd_folder

MESH = ["mesh.data=1", "mesh.fsdp=8"]
REQUESTS = "cat -> dog\nred -> blue\n"
TIMEOUT = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multihost") / "sd1"
    build_sd_folder(path, "sd1")
    return path


def _launch_pair(model_dir: Path, run_dir: Path, req: Path, logs: Path) -> list[tuple[int, str]]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # --local-devices sets the count
    cache = os.environ.get("JAXFORGET_TEST_CACHE", str(REPO / ".jax_cache"))
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAXFORGET_CACHE_DIR=cache)
    procs = []
    for i in range(2):
        cmd = [sys.executable, str(REPO / "launch" / "tpu.py"), "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", "2", "--process-id", str(i), "--local-devices", "4",
               "--concepts", str(req), "--model", str(model_dir), "--run-dir", str(run_dir), *FAST, *MESH]
        log = open(logs / f"process{i}.log", "w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.time() + TIMEOUT
    out = []
    try:
        for p, log in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p, log in procs:  # a failed process leaves its peer waiting in a collective: kill it
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    for i, (p, _) in enumerate(procs):
        out.append((p.returncode, (logs / f"process{i}.log").read_text()))
    return out


def _losses(text: str) -> list[str]:
    return re.findall(r"request \d+ '[^']+' -> '[^']+': snapshot \d+, loss (\S+),", text)


@pytest.mark.slow
def test_two_processes_match_one_process_on_8_devices(model_dir, tmp_path, capsys):
    from safetensors.numpy import load_file

    from jaxforget.checkpoints import RunStore
    from jaxforget.engine import load_dataset_columns

    req = tmp_path / "req.txt"
    req.write_text(REQUESTS)
    # reference: this process (conftest: 8 simulated CPU devices), same config and mesh
    assert _unlearn(model_dir, tmp_path / "ref", req, *MESH) == 0
    ref_log = capsys.readouterr().out

    results = _launch_pair(model_dir, tmp_path / "mp", req, tmp_path)
    for i, (code, text) in enumerate(results):
        assert code == 0, f"process {i} exited with {code}:\n{text[-4000:]}"
    log0, log1 = results[0][1], results[1][1]
    # process 0 reports (one compile for the first request, the second request reuses that
    # executable, which then runs every step); process 1 is quiet
    assert log0.count("train step compiled in") == 1 and log0.count("train step reused") == 1 and "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in log0
    assert "train step compiled" not in log1 and not _losses(log1)
    assert _losses(log0) == _losses(ref_log) and len(_losses(log0)) == 2

    with RunStore.open(tmp_path / "mp", create=False, lock=False) as store:
        assert store.snapshot_ids() == [1, 2] and store.head == 2
        assert [e["request"]["target"] for e in store.ledger()] == ["cat", "red"]
        assert store.metadata(2)["parent"] == 1
    steps = tmp_path / "mp" / "steps"  # step checkpoints are superseded by the snapshots
    assert not steps.exists() or not any(steps.iterdir())

    # the teacher data each run generated (written by process 0 only): equal up to fp32 rounding
    for folder in sorted((tmp_path / "ref" / "data").iterdir()):
        a, b = load_dataset_columns(folder), load_dataset_columns(tmp_path / "mp" / "data" / folder.name)
        for key in (k for k in a if k.endswith("_z0")):
            np.testing.assert_allclose(np.stack(b[key]), np.stack(a[key]), atol=1e-5, rtol=0)

    base = load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    for snap in (1, 2):
        ref, mp = _snapshot_params(tmp_path / "ref", snap), _snapshot_params(tmp_path / "mp", snap)
        assert sorted(ref) == sorted(mp)
        diff = {k: float(np.max(np.abs(ref[k] - mp[k]))) for k in ref}
        moved = {k: float(np.max(np.abs(ref[k] - base[k]))) for k in ref}
        trained = [k for k in ref if ".attn2." in k]
        print(f"snapshot {snap}: max |2 processes - 1 process| {max(diff.values()):.3g}, "
              f"bit-identical tensors {sum(v == 0 for v in diff.values())}/{len(diff)}, "
              f"max training update {max(moved.values()):.3g}")
        assert trained and max(moved[k] for k in trained) > 1e-3
        assert max(diff.values()) <= 1e-4, {k: v for k, v in diff.items() if v > 1e-4}
        assert all(diff[k] == 0 for k in ref if k not in trained)  # untouched weights: exact


# ----------------------------------------------------------------------------- start-up flags
@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--num-processes", "2", "--process-id", "0"], "need --coordinator"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
         "--process-id must be in [0, 2)"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "two", "--process-id", "0"],
         "--num-processes must be an integer"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2"], "--process-id"),
        (["--local-devices", "0"], "--local-devices must be >= 1"),
    ],
)
def test_bad_distributed_flags(tmp_path, flags, needle):
    # rejected before jax.distributed.initialize (nothing waits for a coordinator), exit 2, one line
    res = subprocess.run([sys.executable, str(REPO / "launch" / "tpu.py"), *flags, "--concepts", "x.txt"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err


def test_compilation_cache_dir(tmp_path):
    """launch/tpu.py and the CLI turn on JAX's persistent cache: $JAXFORGET_CACHE_DIR, else
    ~/.cache/jaxforget/xla; a directory configured before (a test suite's) is kept."""
    code = ("import jax; from jaxforget.distributed import enable_compilation_cache as e; "
            "import sys; pre = sys.argv[1]\n"
            "if pre: jax.config.update('jax_compilation_cache_dir', pre)\n"
            "print(e(), jax.config.jax_compilation_cache_dir)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAXFORGET_CACHE_DIR": str(tmp_path / "c"), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code, ""], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [str(tmp_path / "c")] * 2 and (tmp_path / "c").is_dir(), out.stderr
    env.pop("JAXFORGET_CACHE_DIR")
    out = subprocess.run([sys.executable, "-c", code, ""], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [str(tmp_path / ".cache" / "jaxforget" / "xla")] * 2, out.stderr
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "suite")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == [str(tmp_path / "suite")] * 2, out.stderr
