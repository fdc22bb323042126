"""Every Orbax call of the project: async checkpoints of the train state, data state and config.

A step folder holds three items: `state` (the train state pytree, sharded arrays), `data` (the
data iterator's state, JSON) and `config` (the run's config, JSON). Restore takes a pytree of
`jax.ShapeDtypeStruct` carrying the TARGET shardings, so a checkpoint written on one mesh is read
onto another. A state with a NaN or Inf is never written (`NonFiniteStateError`).

Damage shows up at restore: a step that cannot be read (an array file truncated by a full disk,
or missing after a bad copy) raises `UnreadableCheckpointError`, one line naming the step and the
reason, never TensorStore's page of JSON. `restore_newest_readable`, what training resumes with,
sets such steps aside and falls back to the newest that restores completely, or raises.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"


class NonFiniteStateError(FloatingPointError):
    """The state to save has NaN or Inf values: no checkpoint was written."""


class NoCheckpointError(FileNotFoundError):
    """The workdir has no complete checkpoint to restore."""


class UnreadableCheckpointError(OSError):
    """A checkpoint step exists but cannot be read back (truncated, missing or corrupt files)."""

    def __init__(self, directory: Path, step: int, reason: str) -> None:
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint {step} in {directory} is unreadable: {reason}")


def _reason(error: BaseException) -> str:
    """The innermost cause of a restore failure, on one line, without TensorStore's spec dump."""
    seen = error
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    text = str(seen).splitlines()[0] if str(seen) else type(seen).__name__
    text = text.split(" [tensorstore_spec")[0]
    return re.sub(r' in OCDBT database at local file "[^"]*"|Error opening "\w+" driver: ', "", text)[:300]


def _say(text: str) -> None:
    """A line for the user, from process 0 only (not once per host)."""
    if jax.process_index() == 0:
        print(text, flush=True)


def _abandoned_read(error: BaseException | None) -> bool:
    """An error of one of Orbax's reads left running after a restore failed (already reported)."""
    return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed") or \
        "tensorstore_spec" in str(error)


def _quiet_orbax() -> None:
    """Orbax's notices that a user cannot act on stay out of the terminal: the read-only manager's
    warnings, and the tracebacks ('Event loop is closed', 'Task exception was never retrieved') of
    the reads it abandons after a failed restore, which is reported in one line. Errors still show."""
    for name in ("absl", "orbax", "orbax.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if getattr(sys.unraisablehook, "retro_jax", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _abandoned_read(unraisable.exc_value):
            previous(unraisable)

    hook.retro_jax = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(lambda r: not (r.exc_info and _abandoned_read(r.exc_info[1])))


@jax.jit
def _all_finite_per_leaf(leaves: list[jax.Array]) -> jax.Array:
    """bool [n_leaves]: whether each leaf is finite everywhere (one small replicated vector)."""
    if not leaves:
        return jnp.ones((0,), bool)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def non_finite_leaves(tree: Any) -> list[str]:
    """Key paths of the floating-point leaves of `tree` holding a NaN or an Inf (empty: all finite)."""
    floats = [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
              if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)]
    ok = np.asarray(jax.device_get(_all_finite_per_leaf([leaf for _, leaf in floats])))
    return [name for (name, _), good in zip(floats, ok) if not good]


class Checkpointer:
    """Async, keep-last-N checkpoints under `workdir/checkpoints`, saved every `save_interval_steps`.

    All processes must call `save`/`restore` (Orbax coordinates the hosts)."""

    def __init__(self, workdir: str | os.PathLike[str], max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True) -> None:
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        _quiet_orbax()
        self.directory = Path(workdir).absolute() / "checkpoints"
        # Saves exactly at multiples of the interval (and on preemption); Orbax's default would
        # also save the first step a manager sees, which differs between a run and its resume.
        policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, save_decision_policy=policy,
            enable_async_checkpointing=async_save, create=True)
        self._open = lambda: ocp.CheckpointManager(self.directory, options=options)
        self._manager = self._open()

    # ---------------------------------------------------------------------- save
    def save(self, step: int, state: Any, data_state: dict[str, Any], config: dict[str, Any],
             force: bool = False) -> bool:
        """Start an async save of step `step`; True if one was started (interval, or `force`).

        Raises NonFiniteStateError (and writes nothing) if any floating leaf of `state` is not
        finite. The arrays are copied before this returns, so the caller may donate `state`."""
        step = int(step)
        if not force and not self._manager.should_save(step):  # interval reached, newer than the latest
            return False
        bad = non_finite_leaves(state)
        if bad:
            log.error("refusing to checkpoint step %d: non-finite values in %s", step, bad[:5])
            raise NonFiniteStateError(
                f"refusing to write checkpoint {step} to {self.directory}: {len(bad)} leaf/leaves hold "
                f"NaN or Inf, e.g. {bad[:3]}; the last good checkpoint is {self.latest_step()}")
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(data_state),
            CONFIG: ocp.args.JsonSave(config),
        })
        saved = bool(self._manager.save(step, args=args, force=force))
        if saved:
            log.info("checkpoint %d: saving to %s (async)", step, self.directory)
        return saved

    # ---------------------------------------------------------------------- restore
    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(state, data_state, config) of checkpoint `step` (None: the latest).

        `abstract_state`: the state's pytree of jax.ShapeDtypeStruct with the target shardings
        (e.g. `jax.eval_shape` of init plus `sharding=`); the arrays land on those shardings."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise NoCheckpointError(f"no complete checkpoint in {self.directory}")
        elif int(step) not in self.all_steps():
            raise NoCheckpointError(f"no checkpoint {step} in {self.directory}; have {self.all_steps()}")
        try:
            out = self._manager.restore(int(step), args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state),
                DATA: ocp.args.JsonRestore(),
                CONFIG: ocp.args.JsonRestore(),
            }))
        except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
            raise UnreadableCheckpointError(self.directory, int(step), _reason(e)) from None
        log.info("restored checkpoint %d from %s", step, self.directory)
        return out[STATE], dict(out[DATA]), dict(out[CONFIG])

    def restore_newest_readable(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any], dict[str, Any]]:
        """(step, state, data_state, config) of the newest checkpoint that restores completely.

        Newer unreadable steps are named and moved to `checkpoints_unreadable/` beside `checkpoints/`
        (so those steps can be saved again); if none restores, UnreadableCheckpointError (the newest
        step's reason) and nothing is moved."""
        steps, bad = self.all_steps(), []
        if not steps:
            raise NoCheckpointError(f"no complete checkpoint in {self.directory}")
        for step in reversed(steps):
            try:
                state, data, config = self.restore(step, abstract_state)
            except UnreadableCheckpointError as e:
                bad.append(e)
                _say(f"{e}; trying the one before")
                continue
            if bad:
                aside = self._set_aside([e.step for e in bad])
                _say(f"resuming from checkpoint {step}, the newest that restores completely; unreadable "
                     f"steps {[e.step for e in bad]} moved to {aside}")
            return step, state, data, config
        raise UnreadableCheckpointError(self.directory, bad[0].step, (
            f"{bad[0].reason}; no older checkpoint restores either ({steps}), and a workdir that holds a "
            "run never starts from scratch: repair or remove its checkpoints"))

    def _set_aside(self, steps: list[int]) -> Path:
        """Move unreadable steps out of the manager's folder (process 0; the others wait), then
        reopen the manager so that it sees the steps left."""
        self._manager.close()
        aside = self.directory.parent / "checkpoints_unreadable"
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                shutil.rmtree(aside / str(step), ignore_errors=True)
                shutil.move(str(self.directory / str(step)), str(aside / str(step)))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("retro_jax_checkpoints_set_aside")
        self._manager = self._open()
        return aside

    # ---------------------------------------------------------------------- lifetime
    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, then release Orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def checkpoint_steps(workdir: str | os.PathLike[str]) -> list[int]:
    """The steps of a workdir's checkpoints, oldest first (none: [])."""
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        return []
    _quiet_orbax()
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def restore_params_only(workdir: str | os.PathLike[str], abstract_params: Any,
                        step: int | None = None) -> Any:
    """The `params` subtree of checkpoint `step` (None: the latest) of `workdir`, nothing else.

    A true partial restore (Orbax `partial_restore=True`): the optimizer state is not read.
    `abstract_params`: pytree of jax.ShapeDtypeStruct with the target shardings. The state
    pytree must have a `params` field or key (as TrainState does)."""
    _quiet_orbax()
    directory = Path(workdir).absolute() / "checkpoints"
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        step = manager.latest_step() if step is None else int(step)
        if step is None or step not in manager.all_steps():
            raise NoCheckpointError(f"no checkpoint {'' if step is None else step} in {directory}")
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)
        try:
            out = manager.restore(step, args=ocp.args.Composite(**{STATE: args}))
        except Exception as e:  # noqa: BLE001
            raise UnreadableCheckpointError(directory, step, _reason(e)) from None
        return out[STATE]["params"]
    finally:
        manager.close()
