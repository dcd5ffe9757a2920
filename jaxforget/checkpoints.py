"""Orbax checkpoint I/O (the one module that writes training state to disk).

``StepCheckpointer``: mid-run step checkpoints of a pytree of arrays (params, optimizer state,
EMA, step), so a crash loses at most ``every`` steps and re-running the same command resumes.
Orbax writes each step into a temporary folder and renames it when complete, so a killed process
never leaves a half-written checkpoint that a resume would pick up.

``RunStore``: the state of one continual-unlearning run, one snapshot per applied request::

    run_dir/
      run.json                 {format, base_model, base_hash, created, jaxforget_version}; written once
      head.json                {"head": id, "last_id": n}: the current snapshot (0 = base model) and
                               the highest id ever given out (ids are never reused, even after deletion)
      failed.json              {"failures": [{request_index, step, parent, message, created}, ...]}
      config.json              config of the latest invocation (save_run_config; informational)
      snapshots/<id>/          one Orbax CheckpointManager step per snapshot (ids 1, 2, ...), items:
        params/ opt_state/ reg/    the pytrees given to save_snapshot (a None item is not stored)
        metadata/metadata          JSON: id, parent, request, request_index, config, metrics,
                                   base_hash, params_hash, items, created
      steps/<parent>-<request_index>/   StepCheckpointer of the request in progress on top of
                               snapshot <parent>; deleted once that request's snapshot is written

The ledger of applied requests is the chain of snapshot metadata from head back through parents
to 0. Rollback only moves head (later snapshots are kept unless asked), so a new snapshot after a
rollback to k gets a fresh id with parent k. Step checkpoints are keyed by (parent, request) so
that a rollback never resumes a request that was in progress on another branch.

Why nothing is lost:
- every JSON file is written to a temporary file in the same folder, fsynced, then os.replace'd;
- a snapshot is written by Orbax into ``<id>.orbax-checkpoint-tmp`` and renamed when complete;
  a killed save leaves only that temporary folder, which listings ignore and the next open removes;
- a snapshot id that exists is never written again (RunStateError), and ids only grow;
- head.json moves only after the snapshot is complete. If a process dies between the two, the
  next open finds the complete snapshot newer than ``last_id`` whose parent is head and adopts it;
- a flock on ``run_dir/.lock`` stops a second process from writing the same run at once.

Multi-host: every process calls the same methods (Orbax saves and restores are collective);
only process 0 writes JSON files or deletes folders, followed by a barrier. The run directory
must be on a filesystem every process sees (JSON files use local-path renames).
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxforget import __version__
from jaxforget.errors import JaxforgetError

FORMAT = 1  # run-directory layout version, stored in run.json
META_ITEM = "metadata"  # the JSON item of every snapshot


class RunStateError(JaxforgetError):
    """A run directory cannot be used as asked (other base model, unknown snapshot, busy, ...)."""


# Orbax splits every replicated jax.Array into one slice per replica so that replicas (hosts)
# share the writing; each slice is an eager device op. For small arrays that is all overhead:
# a toy-world snapshot (324 leaves x 3 trees, 8 replicas) took 9-10 s to save, 3 s without the
# split (NOTES.md, "Test suite time", session 15). Arrays whose slices would be smaller than
# this are saved whole from one replica; large SD / SDXL weights keep the parallel write.
MIN_REPLICA_SLICE_BYTES = 256 * 1024


@functools.cache
def use_array_handler() -> None:
    """Register (once per process) Orbax's jax.Array handler with MIN_REPLICA_SLICE_BYTES."""
    from absl import logging as absl_logging

    default = ocp.type_handlers.get_type_handler(jax.Array)
    # keep the default handler's per-array metadata store (not a public constructor argument)
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
        array_metadata_store=getattr(default, "_array_metadata_store", None))
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns on any override, meant or not
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logging.set_verbosity(level)


class StepCheckpointer:
    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 2):
        use_array_handler()
        self.directory = Path(directory).absolute()
        self.every = max(int(every), 1)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, abstract_tree: Any, step: int | None = None) -> tuple[int, Any] | None:
        """(step, tree) of the given or latest checkpoint, shaped/sharded like ``abstract_tree``."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_tree)
        tree = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        return step, tree

    def maybe_save(self, step: int, tree: Any, *, force: bool = False) -> bool:
        """Save at every ``every``-th step (or when forced, e.g. at the end of a stage)."""
        if not force and step % self.every:
            return False
        if self.latest_step() == step:
            return False
        self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
        self._manager.wait_until_finished()
        return True

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# ----------------------------------------------------------------------------- helpers
def to_jsonable(x: Any) -> Any:
    """Plain JSON values from configs, requests and metrics (dataclasses, tuples, numpy/jax
    scalars, paths). Non-finite floats become strings ("nan", "inf") so the files stay strict JSON."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return to_jsonable(np.asarray(x).tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"cannot store a {type(x).__name__} in run metadata: {x!r}")


def _write_json_atomic(path: Path, data: dict) -> None:
    # a reader sees the old file or the new one, never a partial one
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunStateError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise RunStateError(f"{path}: expected a JSON object")
    return data


def _key_str(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def tree_params_hash(params: Any) -> str | None:
    """The hash of a pure nested dict of params (16 hex digits). Equals
    ``jaxforget.io.diffusers_folder.params_hash(module)`` for ``nnx.to_pure_dict`` of the module's
    params (same paths, order and bytes). None when the arrays are not all on this process."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if any(isinstance(v, jax.Array) and not v.is_fully_addressable for _, v in leaves):
        return None
    h = hashlib.sha256()
    for path, v in leaves:
        arr = np.ascontiguousarray(np.asarray(jax.device_get(v)))
        h.update(f"{'.'.join(_key_str(k) for k in path)}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxforget:{name}")


# ----------------------------------------------------------------------------- run store
class RunStore:
    """Snapshots, ledger, rollback and step checkpoints of one run directory (see module doc).

    Open with ``RunStore.open``; use as a context manager or call ``close()`` (releases the lock).
    """

    def __init__(self, run_dir: Path, info: dict, *, lock: bool = True):
        self.run_dir = run_dir
        self.info = info
        self._primary = jax.process_index() == 0
        use_array_handler()
        self._lock_fd: int | None = self._acquire_lock() if lock and self._primary else None
        try:
            self._manager = ocp.CheckpointManager(
                run_dir / "snapshots",
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=None, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
                ),
            )
            self._meta_cache: dict[int, dict] = {}
            state = _read_json(self._head_file) if self._head_file.exists() else {"head": 0, "last_id": 0}
            self._head, self._last_id = int(state["head"]), int(state.get("last_id", 0))
            self._adopt_orphans()
            if self._head and self._head not in self.snapshot_ids():
                raise RunStateError(f"{self._head_file}: head snapshot {self._head} does not exist in {run_dir}")
        except BaseException:
            self.close()
            raise

    # -- opening
    @classmethod
    def open(
        cls,
        run_dir: str | os.PathLike,
        *,
        base_model: str | None = None,
        base_hash: str | None = None,
        create: bool = True,
        lock: bool = True,
    ) -> "RunStore":
        """Open (or, with ``create``, start) the run in ``run_dir``.

        ``base_hash`` (``io.folder_hash`` of the base model) must match the run's; None skips the
        check (export / rollback of an existing run). Every check happens before anything is
        written: a mismatch or a folder that is not a run raises RunStateError and leaves the
        disk untouched.
        """
        run_dir = Path(run_dir).absolute()
        run_file = run_dir / "run.json"
        if run_file.exists():
            info = _read_json(run_file)
            if int(info.get("format", 0)) > FORMAT:
                raise RunStateError(f"{run_dir}: run format {info.get('format')} is newer than this jaxforget "
                                    f"({__version__}) understands")
            if base_hash is not None and info.get("base_hash") != base_hash:
                raise RunStateError(
                    f"{run_dir}: this run was made from base model {info.get('base_model')!r} (hash "
                    f"{info.get('base_hash')}), not from {base_model!r} (hash {base_hash}); use the original "
                    f"model or a new run directory")
        else:
            if not create:
                raise RunStateError(f"{run_dir}: not a jaxforget run directory (no run.json)")
            if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
                raise RunStateError(f"{run_dir}: exists and is not a jaxforget run directory (no run.json); "
                                    f"refusing to write into it")
            if not base_hash:
                raise RunStateError(f"{run_dir}: a new run needs the base model's hash")
            info = {"format": FORMAT, "base_model": base_model, "base_hash": base_hash,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jaxforget_version": __version__}
            if jax.process_index() == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                _write_json_atomic(run_file, info)
            _barrier("run-create")
        return cls(run_dir, info, lock=lock)

    def close(self) -> None:
        manager = getattr(self, "_manager", None)
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
            self._manager = None
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _acquire_lock(self) -> int | None:
        fd = os.open(self.run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunStateError(f"{self.run_dir}: in use by another jaxforget process") from None
            return None  # a filesystem without flock: go on unlocked rather than refuse to run
        return fd

    # -- state
    @property
    def base_hash(self) -> str:
        return self.info["base_hash"]

    @property
    def base_model(self) -> str | None:
        return self.info.get("base_model")

    @property
    def run_info(self) -> dict:
        """Contents of run.json (base_model, base_hash, created, jaxforget_version, format)."""
        return dict(self.info)

    def save_run_config(self, config: dict[str, Any]) -> None:
        """Write the config of the latest invocation to run_dir/config.json (for people reading
        the run; each snapshot's metadata keeps the config it was trained with)."""
        if self._primary:
            _write_json_atomic(self.run_dir / "config.json", config)
        _barrier("config")

    @property
    def head(self) -> int:
        """The current snapshot id (0 = the base model)."""
        return self._head

    @property
    def _head_file(self) -> Path:
        return self.run_dir / "head.json"

    def _set_head(self, head: int, last_id: int) -> None:
        if self._primary:
            _write_json_atomic(self._head_file, {"head": head, "last_id": last_id})
        _barrier("head")
        self._head, self._last_id = head, last_id

    def _adopt_orphans(self) -> None:
        # a snapshot newer than last_id was completed but head.json was not moved (killed in
        # between): it is the child of head the interrupted run meant to commit
        for sid in self.snapshot_ids():
            if sid > self._last_id:
                if self.metadata(sid).get("parent") == self._head:
                    self._set_head(sid, sid)
                else:
                    self._set_head(self._head, sid)

    def snapshot_ids(self) -> list[int]:
        """All stored snapshot ids, ascending (complete ones only)."""
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def _check_id(self, sid: int) -> None:
        if sid == 0:
            raise RunStateError(f"{self.run_dir}: snapshot 0 is the base model; it is not stored in the run")
        if sid not in self.snapshot_ids():
            known = ", ".join(map(str, self.snapshot_ids())) or "none"
            raise RunStateError(f"{self.run_dir}: no snapshot {sid} (snapshots: {known}; 0 = base model)")

    def metadata(self, sid: int) -> dict:
        """The JSON metadata of snapshot ``sid``."""
        if sid not in self._meta_cache:
            self._check_id(sid)
            out = self._manager.restore(sid, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
            self._meta_cache[sid] = out[META_ITEM]
        return copy.deepcopy(self._meta_cache[sid])

    def chain(self, sid: int | None = None) -> list[int]:
        """Snapshot ids from the first applied request to ``sid`` (default head), oldest first."""
        sid = self._head if sid is None else sid
        out = []
        while sid:
            out.append(sid)
            parent = int(self.metadata(sid)["parent"])
            if parent >= sid:  # ids grow, so a parent is always older; anything else is corruption
                raise RunStateError(f"{self.run_dir}: snapshot {sid} has parent {parent}: broken ledger")
            sid = parent
        return out[::-1]

    def ledger(self, sid: int | None = None) -> list[dict]:
        """Metadata of the applied requests up to ``sid`` (default head), oldest first."""
        return [self.metadata(s) for s in self.chain(sid)]

    def applied_targets(self) -> list[str]:
        """Targets of the applied requests (the ledger), oldest first."""
        return [m["request"].get("target") for m in self.ledger()]

    # -- snapshots
    def save_snapshot(self, tree: dict[str, Any], metadata: dict[str, Any]) -> int:
        """Store a snapshot on top of head and make it the new head; returns its id.

        ``tree``: named pytrees of arrays (``{"params": ..., "opt_state": ..., "reg": ...}``);
        a None value is not stored. ``metadata``: at least ``request`` (dict or dataclass) and
        ``request_index``; ``config`` and ``metrics`` are usual. The store fills id, parent,
        base_hash, created, items and (unless given) params_hash. Afterwards the step
        checkpoints of this request are deleted: the snapshot supersedes them.
        """
        for name in tree:
            if not name.isidentifier() or name == META_ITEM:
                raise ValueError(f"snapshot item name {name!r}: use an identifier other than {META_ITEM!r}")
        if "request" not in metadata or "request_index" not in metadata:
            raise ValueError("snapshot metadata needs 'request' and 'request_index'")
        items = {k: v for k, v in tree.items() if v is not None}
        for path, leaf in jax.tree_util.tree_flatten_with_path(items)[0]:
            # refuse before writing: a leaf Orbax cannot store fails part-way through a save
            if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float)):
                raise TypeError(f"snapshot leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}, "
                                f"not an array")
        existing = self.snapshot_ids()
        sid = max([self._last_id, *existing]) + 1
        if sid in existing:  # cannot happen through this API; never overwrite a snapshot
            raise RunStateError(f"{self.run_dir}: snapshot {sid} already exists; refusing to overwrite it")
        meta = {
            "config": {},
            "metrics": {},
            **metadata,
            "id": sid,
            "parent": self._head,
            "base_hash": self.base_hash,
            "items": sorted(items),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if meta.get("params_hash") is None and "params" in items:
            meta["params_hash"] = tree_params_hash(items["params"])
        meta = to_jsonable(meta)
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        args[META_ITEM] = ocp.args.JsonSave(meta)
        try:
            self._manager.save(sid, args=ocp.args.Composite(**args), force=True)
        except ocp.checkpoint_manager.StepAlreadyExistsError:
            raise RunStateError(f"{self.run_dir}: snapshot {sid} already exists; refusing to overwrite it") from None
        self._manager.wait_until_finished()
        self._meta_cache[sid] = meta
        parent = self._head
        self._set_head(sid, sid)
        self.clear_steps(int(meta["request_index"]), parent=parent)
        return sid

    def load_snapshot(self, sid: int, abstract_tree: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        """(tree, metadata) of snapshot ``sid``. Each item of ``abstract_tree`` (arrays or
        ShapeDtypeStructs; give sharded ones to restore sharded) is restored with its shapes,
        dtypes, shardings and pytree structure; an item given as None comes back as None."""
        meta = self.metadata(sid)
        wanted = {k: v for k, v in abstract_tree.items() if v is not None}
        missing = sorted(set(wanted) - set(meta.get("items", [])))
        if missing:
            raise RunStateError(f"{self.run_dir}: snapshot {sid} has no {', '.join(missing)} "
                                f"(stored: {', '.join(meta.get('items', []))})")
        args = {k: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, v)) for k, v in wanted.items()}
        out = self._manager.restore(sid, args=ocp.args.Composite(**args)) if args else {}
        return {k: (out[k] if k in wanted else None) for k in abstract_tree}, meta

    def snapshot_params(self, sid: int, abstract_params: Any) -> Any:
        """Only the params of snapshot ``sid`` (what an export needs; the optimizer state stays on disk)."""
        return self.load_snapshot(sid, {"params": abstract_params})[0]["params"]

    def rollback(self, to: int, *, delete_later: bool = False) -> list[int]:
        """Make snapshot ``to`` (0 = base model) the head: the next request continues from it.
        Later snapshots are kept (a later rollback can return to them) unless ``delete_later``,
        which deletes every snapshot newer than ``to`` and their step checkpoints. Returns the
        deleted ids. Ids are never reused, so a snapshot after a rollback always has a fresh id."""
        to = int(to)
        if to != 0:
            self._check_id(to)
        self._set_head(to, self._last_id)  # move head first: a crash while deleting leaves a valid head
        if not delete_later:
            return []
        doomed = [s for s in self.snapshot_ids() if s > to]
        for sid in doomed:
            self._manager.delete(sid)  # Orbax deletes on the primary process only
            self._meta_cache.pop(sid, None)
        if self._primary:
            for d in self._step_dirs():
                if int(d.name.split("-")[0]) in doomed:
                    shutil.rmtree(d, ignore_errors=True)
        _barrier("rollback")
        return doomed

    # -- step checkpoints of the request in progress
    def step_dir(self, request_index: int, *, parent: int | None = None) -> Path:
        """Folder of the step checkpoints of request ``request_index`` applied on top of
        snapshot ``parent`` (default head)."""
        parent = self._head if parent is None else int(parent)
        return self.run_dir / "steps" / f"{parent}-{int(request_index)}"

    def step_checkpointer(self, request_index: int, *, every: int = 25, keep: int = 2) -> StepCheckpointer:
        """StepCheckpointer for the request about to run on top of head; a rerun of the same
        command finds its latest step there (close it before ``save_snapshot``)."""
        return StepCheckpointer(self.step_dir(request_index), every=every, keep=keep)

    def clear_steps(self, request_index: int, *, parent: int | None = None) -> None:
        """Delete the step checkpoints of (parent, request_index) (save_snapshot does this)."""
        if self._primary:
            shutil.rmtree(self.step_dir(request_index, parent=parent), ignore_errors=True)
        _barrier("clear-steps")

    def _step_dirs(self) -> list[Path]:
        root = self.run_dir / "steps"
        return sorted(d for d in root.iterdir() if d.is_dir() and d.name.split("-")[0].isdigit()) if root.is_dir() else []

    # -- failures
    @property
    def _failed_file(self) -> Path:
        return self.run_dir / "failed.json"

    def record_failure(self, request_index: int, step: int, message: str) -> dict:
        """Append a failure (e.g. a NaN loss) to failed.json; snapshots and head are untouched,
        so the last good snapshot stays current."""
        entry = {"request_index": int(request_index), "step": int(step), "parent": self._head,
                 "message": str(message), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self._primary:
            _write_json_atomic(self._failed_file, {"failures": [*self.failures(), entry]})
        _barrier("failure")
        return entry

    def failures(self) -> list[dict]:
        """Recorded failures, oldest first."""
        return list(_read_json(self._failed_file).get("failures", [])) if self._failed_file.exists() else []


__all__ = ["StepCheckpointer", "RunStore", "RunStateError", "tree_params_hash", "to_jsonable", "FORMAT"]
