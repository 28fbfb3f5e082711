"""Orbax checkpoints of the train state: async saves, restore onto any mesh, newest good step.

A checkpoint is only trusted if it restores, its arrays hash to the fingerprint saved beside
them, they are all finite and its step counter matches its directory. Orbax writes each step in a
temporary directory and renames it when complete, so a kill -9 mid-save leaves no half-written
step behind; the fingerprint catches what orbax cannot (bytes changed inside a data file read
back without error). Training moves a checkpoint that fails to `unusable_checkpoints/` beside the
checkpoint directory, never deleting it, and tries the previous one; the commands that only read a
workdir (generate, evaluate, export) skip it the same way but leave it where it is. A restore that
fails ends the reads it left in flight before the previous checkpoint is tried, so a skipped
checkpoint prints its one line and nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mtp_jax.errors import UserError
from mtp_jax.metrics import log

UNUSABLE = "unusable_checkpoints"
MODEL_PARTS = ("params", "step")  # what restore reads for a command that only uses the model


def has_checkpoints(directory: pathlib.Path) -> bool:
    """Whether directory holds a finished checkpoint (a directory named by its step), read without
    starting a CheckpointManager: a writable one starts a clean-up thread that prints a traceback
    if the process exits before it ends, as it does when a command is refused."""
    directory = pathlib.Path(directory)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


class Checkpointer:
    """A thin wrapper over ocp.CheckpointManager for one pytree (the train state)."""

    def __init__(self, directory: pathlib.Path, keep: int | None, *, read_only: bool = False):
        """read_only: for the commands that only load a model (generate, evaluate, export), which may
        run while training writes to the same directory: nothing is saved, deleted or moved, and a
        save in progress (a temporary directory) is left alone."""
        self.directory = pathlib.Path(directory).absolute()
        self.unusable = self.directory.with_name(UNUSABLE)
        self.read_only = read_only
        options = (
            ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
            if read_only
            else ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, cleanup_tmp_directories=True
            )
        )  # leftovers of kill -9
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                item_handlers={
                    "state": ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler(),
                    "fingerprint": ocp.JsonCheckpointHandler(),
                },  # the former can restore a part
                options=options,
            )
        except OSError as e:
            raise UserError(
                f"cannot create the checkpoint directory {self.directory} ({e.strerror or e}): "
                "pass a --workdir on a writable disk"
            ) from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Starts an async save; the next save (or wait) waits for this one to finish.

        The fingerprint is taken on device (no copy of the state to the host beyond orbax's own)."""
        sums, finite = (np.asarray(x) for x in jax.device_get(fingerprint(state)))
        if not finite:  # train_step never lets a non-finite value into the state; refuse to persist one
            raise RuntimeError(f"refusing to save a checkpoint at step {step}: the state holds non-finite values")
        with self._write_errors():
            self.manager.save(
                step,
                force=True,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), fingerprint=ocp.args.JsonSave(sums.tolist())
                ),
            )

    def wait(self) -> None:
        with self._write_errors():
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _write_errors(self):
        """Turns a failed write (disk full, directory gone or read-only) into one clear line. An
        async save fails at the next save or wait, so the line names the newest complete step."""
        try:
            yield
        except Exception as e:
            if isinstance(e, UserError) or not _is_write_error(e):
                raise
            self.manager.reload()
            newest = self.manager.latest_step()
            with contextlib.suppress(Exception):  # joins orbax's threads, which re-raise the same failure
                self.manager.close()
            raise UserError(
                f"could not write a checkpoint to {self.directory} ({_first_line(e)}): free disk space "
                f"or fix the directory's permissions; the newest complete checkpoint is step "
                f"{newest}"
            ) from None

    def restore(self, step: int, abstract_state=None):
        """Restores the whole state onto the shardings of abstract_state (ShapeDtypeStructs with
        .sharding), so a checkpoint written on one mesh loads onto another. A read-only checkpointer
        (abstract_state None) restores only the parameters and the step counter, as saved, onto
        this process's first device: the optimizer state is not read, and the fingerprint is checked
        on the host (no program to compile), all that a command using the model needs. Raises on
        any sign of damage."""
        if self.read_only:
            return self._restore_model(step)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), fingerprint=ocp.args.JsonRestore()),
        )
        state = restored["state"]
        sums, finite = (np.asarray(x) for x in jax.device_get(fingerprint(state)))
        _check(state, step, _rows(restored["fingerprint"]), sums.tolist(), bool(finite), whole=True)
        return state

    def _restore_model(self, step: int) -> dict:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = self.manager.item_metadata(step)["state"]
        target = {
            key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved[key])
            for key in MODEL_PARTS
        }
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    target, ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
                ),
                fingerprint=ocp.args.JsonRestore(),
            ),
        )
        state = restored["state"]
        sums, finite = host_fingerprint(state)
        _check(state, step, _rows(restored["fingerprint"]), sums, finite, whole=False)
        return state

    def restore_newest_good(self, abstract_state=None):
        """(step, state) of the newest checkpoint that restores cleanly (see restore for
        abstract_state), or (None, None) when there is none to restore.

        Each damaged checkpoint is reported in one line and (unless read_only) moved aside. If
        checkpoints were moved aside (now or by an earlier run) and none is left, raises rather
        than letting the run start over in a workdir that holds its earlier work; read_only, raises
        when every checkpoint is damaged."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with _no_reads_left_behind():
                    state, problem = self.restore(step, abstract_state), None
            except Exception as e:  # noqa: BLE001 — orbax and tensorstore raise many types for damaged files
                state, problem = None, _first_line(e)
            if _all_processes_agree(problem is None):
                return step, state
            damaged.append(str(step))
            where = "" if self.read_only else f"moved it to {self._move_aside(step)}, "
            if jax.process_index() == 0:
                log(
                    f"checkpoint {self.directory / str(step)} is unusable ({problem or 'damaged on another process'}); "
                    f"{where}trying the previous one"
                )
        if damaged and self.read_only:
            raise UserError(
                f"no usable checkpoint in {self.directory}: step{'s' * (len(damaged) > 1)} "
                f"{', '.join(damaged)} {'are' if len(damaged) > 1 else 'is'} damaged (see above); "
                "train the model again, in a new --workdir"
            )
        if self.unusable.is_dir() and any(self.unusable.iterdir()):
            raise UserError(
                f"no usable checkpoint in {self.directory}; the damaged ones are in {self.unusable}: "
                f"to start over, use a new --workdir (or delete {self.directory.parent})"
            )
        return None, None

    def _move_aside(self, step: int) -> pathlib.Path:
        target = self.unusable / str(step)
        suffix = 0
        while target.exists():  # the same step may go bad twice (e.g. a full disk twice)
            suffix += 1
            target = self.unusable / f"{step}-{suffix}"
        if jax.process_index() == 0:
            self.unusable.mkdir(exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.close()


class _TidyEventLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first cancels the tasks still pending on it and waits for
    them to end, as asyncio.run does on leaving.

    Orbax runs each restore in a fresh event loop and closes it as soon as the restore raises, while
    the other tensorstore reads it gathered are still in flight. Each read that ends later calls
    back into the closed loop and its RuntimeError('Event loop is closed') is printed as a
    traceback, as is the error of each of orbax's read coroutines collected unfinished: up to
    hundreds of lines for one damaged checkpoint, more or fewer with the timing. Tensorstore drops
    a cancelled read; one that ended just as it was cancelled may still call back after the close,
    to wake a task that has ended, and that call is dropped here."""

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            pending = asyncio.all_tasks(self)
            for task in pending:
                task.cancel()
            # Runs the callbacks already due too: a read that failed as the restore stopped has one
            # that marks its error as seen (unseen, asyncio logs it with a traceback).
            self.run_until_complete(_ended(pending))
        super().close()

    def call_soon_threadsafe(self, callback, *args, context=None):
        if self.is_closed():  # closed only once every task on it ended: nothing is left to wake
            return None
        return super().call_soon_threadsafe(callback, *args, context=context)


async def _ended(tasks) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)  # their errors (the damage again) were reported


class _TidyEventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _TidyEventLoop()


@contextlib.contextmanager
def _no_reads_left_behind():
    """The event loops orbax makes meanwhile are _TidyEventLoops (orbax calls
    asyncio.new_event_loop(), which asks the policy). The policy is the process's: a loop another
    thread makes meanwhile also ends its tasks before closing, as asyncio.run's loops do."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_TidyEventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def check_writable(workdir: pathlib.Path) -> None:
    """Raises UserError unless this process can create files in `workdir` (made if missing)."""
    probe = pathlib.Path(workdir) / f".write-test-{jax.process_index()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"cannot write to --workdir={workdir} ({e.strerror or e}): pass a directory on a writable disk"
        ) from None


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying target shardings, the restore target for orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@jax.jit
def fingerprint(tree):
    """([n_leaves, 2] uint32, bool): per leaf, the plain and the position-weighted wrapping sums of
    its bits, and whether every float is finite.

    Integer sums are exact and order-free, so the fingerprint does not depend on the mesh a state
    is sharded on; odd weights make any single changed word change the weighted sum."""

    def sums(x):
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).reshape(-1)
        bits = bits.astype(jnp.uint32)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1
        return jnp.stack([bits.sum(dtype=jnp.uint32), (bits * weights).sum(dtype=jnp.uint32)])

    leaves = jax.tree.leaves(tree)
    finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]))
    return jnp.stack([sums(x) for x in leaves]), finite


def host_fingerprint(tree) -> tuple[list[tuple[int, int]], bool]:
    """fingerprint's rows and finiteness, computed with NumPy on arrays in host memory: the same
    wrapping uint32 arithmetic, so the rows are equal."""
    rows, finite = [], True
    for x in jax.tree.leaves(tree):
        x = np.ascontiguousarray(np.asarray(x)).reshape(-1)
        if x.dtype == np.bool_:
            x = x.astype(np.uint8)
        if jnp.issubdtype(x.dtype, jnp.floating):  # bfloat16 too, which NumPy does not call floating
            finite = finite and bool(np.isfinite(x.astype(np.float32)).all())
        bits = x.view(f"uint{8 * x.dtype.itemsize}").astype(np.uint32)
        weights = np.arange(bits.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        rows.append((int(bits.sum(dtype=np.uint32)), int((bits * weights).sum(dtype=np.uint32))))
    return rows, finite


def _rows(saved) -> collections.Counter:
    return collections.Counter(map(tuple, np.asarray(saved, np.uint32).tolist()))


def _check(state, step: int, saved: collections.Counter, sums: list, finite: bool, whole: bool) -> None:
    """Raises unless the restored arrays' fingerprint rows are the saved ones (whole: all of them;
    else a part of them), all finite, and the step counter is the directory's. Rows are compared as
    multisets: a restore target built from orbax's metadata may order the leaves differently from
    the train state."""
    restored = collections.Counter(map(tuple, sums))
    if (restored != saved) if whole else (restored - saved):
        raise ValueError("its arrays do not match the fingerprint saved with them")
    if not finite:
        raise ValueError("it holds non-finite values")
    if int(jax.device_get(state["step"])) != step:
        raise ValueError(f"its step counter is {int(jax.device_get(state['step']))}, not {step}")


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.array(ok)).all())


def _is_write_error(error: BaseException) -> bool:
    """Whether a failed save ran out of room or permission (orbax wraps tensorstore's OSErrors in
    ValueError/Exception, so the message is the only common ground)."""
    text = str(error).lower()
    return isinstance(error, OSError) or any(
        word in text
        for word in ("os_error_code", "no space", "file too large", "read-only", "permission denied", "disk quota")
    )


def _first_line(error: BaseException) -> str:
    """The innermost cause's type and first line: orbax wraps tensorstore's errors (which name
    the file and the byte range that failed) in messages that print a bound method's repr."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"
