"""Every Orbax call of the project: async checkpoints of the train state, data state and config.

A checkpoint step folder holds three items:
  state   the train state pytree (step, params, opt_state, ...), Orbax StandardSave (sharded arrays)
  data    the data iterator's state (a JSON dict, `TrainLoader.state()`)
  config  the run's config (a JSON dict)

Restore takes an abstract state: a pytree of `jax.ShapeDtypeStruct` carrying the TARGET
shardings, so a checkpoint written on one mesh is read onto another (resharding). A state
whose floating-point leaves are not all finite is never written (`NonFiniteStateError`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"


class NonFiniteStateError(FloatingPointError):
    """The state to save has NaN or Inf values: no checkpoint was written."""


class NoCheckpointError(FileNotFoundError):
    """The workdir has no complete checkpoint to restore."""


def _float_leaves(tree: Any) -> tuple[list[str], list[jax.Array]]:
    """(key paths, leaves) of the floating-point array leaves of a pytree."""
    names, leaves = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
            names.append(jax.tree_util.keystr(path))
            leaves.append(leaf)
    return names, leaves


@jax.jit
def _all_finite_per_leaf(leaves: list[jax.Array]) -> jax.Array:
    """bool [n_leaves]: whether each leaf is finite everywhere (one small replicated vector)."""
    if not leaves:
        return jnp.ones((0,), bool)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def non_finite_leaves(tree: Any) -> list[str]:
    """Key paths of the floating-point leaves of `tree` holding a NaN or an Inf (empty: all finite)."""
    names, leaves = _float_leaves(tree)
    ok = np.asarray(jax.device_get(_all_finite_per_leaf(leaves)))
    return [n for n, good in zip(names, ok) if not good]


class Checkpointer:
    """Async, keep-last-N checkpoints under `workdir/checkpoints`, saved every `save_interval_steps`.

    All processes must call `save`/`restore` (Orbax coordinates the hosts)."""

    def __init__(self, workdir: str | os.PathLike[str], max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True) -> None:
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = Path(workdir).absolute() / "checkpoints"
        # Saves exactly at multiples of the interval (and on preemption); Orbax's default would
        # also save the first step a manager sees, which differs between a run and its resume.
        policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, save_decision_policy=policy,
            enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ---------------------------------------------------------------------- save
    def should_save(self, step: int) -> bool:
        """True if `save(step, ...)` would write (interval reached, step newer than the latest)."""
        return self._manager.should_save(int(step))

    def save(self, step: int, state: Any, data_state: dict[str, Any], config: dict[str, Any],
             force: bool = False) -> bool:
        """Start an async save of step `step`; True if one was started (interval, or `force`).

        Raises NonFiniteStateError (and writes nothing) if any floating leaf of `state` is not
        finite. The arrays are copied before this returns, so the caller may donate `state`."""
        step = int(step)
        if not force and not self.should_save(step):
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
        out = self._manager.restore(int(step), args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA: ocp.args.JsonRestore(),
            CONFIG: ocp.args.JsonRestore(),
        }))
        log.info("restored checkpoint %d from %s", step, self.directory)
        return out[STATE], dict(out[DATA]), dict(out[CONFIG])

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        """Just the config saved with checkpoint `step` (None: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise NoCheckpointError(f"no complete checkpoint in {self.directory}")
        out = self._manager.restore(int(step), args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
        return dict(out[CONFIG])

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


def restore_params_only(workdir: str | os.PathLike[str], abstract_params: Any,
                        step: int | None = None) -> Any:
    """The `params` subtree of checkpoint `step` (None: the latest) of `workdir`, nothing else.

    A true partial restore (Orbax `partial_restore=True`): the optimizer state is not read.
    `abstract_params`: pytree of jax.ShapeDtypeStruct with the target shardings. The state
    pytree must have a `params` field or key (as TrainState does)."""
    directory = Path(workdir).absolute() / "checkpoints"
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        step = manager.latest_step() if step is None else int(step)
        if step is None or step not in manager.all_steps():
            raise NoCheckpointError(f"no checkpoint {'' if step is None else step} in {directory}")
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)
        out = manager.restore(step, args=ocp.args.Composite(**{STATE: args}))
        return out[STATE]["params"]
    finally:
        manager.close()
