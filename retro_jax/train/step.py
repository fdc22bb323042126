"""Loss, optimizer, learning-rate schedule and the jitted (sharded) train step.

A batch is a dict of arrays:
  tokens     int32 [B, N]    inputs
  targets    int32 [B, N]    next tokens
  loss_mask  float32 [B, N]  1 where the target counts (0 on padding)
  neighbours int32 [B, ceil(N/m), K, 2m]   optional; absent = retrieval off

A step whose loss or gradient norm is not finite is skipped: parameters and optimizer state
stay bit for bit as they were, `skipped` and `bad_in_a_row` count it (a good step resets
`bad_in_a_row`; the loop stops on too many in a row). `step` counts batches consumed, skipped
or not; the optimizer (and so the schedule) has seen `step - skipped` updates.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from retro_jax.config import ModelConfig
from retro_jax.runtime.forward import token_nll
from retro_jax.runtime.mesh import batch_sharding, on_mesh, replicated
from retro_jax.runtime.state import TrainState

LN2 = math.log(2.0)


# -- optimisation ------------------------------------------------------------------------

def make_schedule(lr_max: float, warmup: int, total: int, init: float = 1e-7,
                  final_ratio: float = 0.1) -> optax.Schedule:
    """The paper's schedule: linear warm-up init -> lr_max over `warmup` steps, then cosine
    decay to final_ratio * lr_max at step `total` (constant after)."""
    if warmup < 0 or total <= warmup:
        raise ValueError(f"need 0 <= warmup < total; got warmup={warmup}, total={total}")
    return optax.warmup_cosine_decay_schedule(init_value=init, peak_value=lr_max, warmup_steps=warmup,
                                              decay_steps=total, end_value=final_ratio * lr_max)


def make_optimizer(learning_rate: float | optax.Schedule = 2e-4, weight_decay: float = 0.1,
                   clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.95,
                   trainable_mask: Any | None = None) -> optax.GradientTransformation:
    """AdamW (paper §C.1: weight decay 0.1) after optional global-norm gradient clipping.

    trainable_mask: None (train all) or a pytree of bools shaped like the params; False
    leaves get zero updates (they stay bit-identical: see `train_step`), and neither their
    gradients nor their weights enter clipping or AdamW state."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    if trainable_mask is None:
        return tx
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable_mask)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def optimizer_from_config(train: Any, trainable_mask: Any | None = None
                          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) of a config's `train` section: what `train` and `plan` both run.

    The cosine horizon is `train.decay_steps` (0: `train.steps`); `train` fixes it when a run
    starts, so a resume with a larger --steps extends training at the final rate."""
    schedule = make_schedule(train.lr_max, train.warmup_steps, decay_horizon(train), train.lr_init,
                             train.lr_final_ratio)
    return make_optimizer(schedule, train.weight_decay, train.clip_norm, train.b1, train.b2,
                          trainable_mask=trainable_mask), schedule


def decay_horizon(train: Any) -> int:
    """The step at which the cosine schedule reaches its final rate: train.decay_steps, or train.steps."""
    return int(train.get("decay_steps", 0) or train.steps)


# -- loss --------------------------------------------------------------------------------

def _masked_sum(params: Any, cfg: ModelConfig, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of the masked token losses in nats, number of counted tokens): the runtime's forward."""
    nll = token_nll(params, batch["tokens"], batch["targets"], batch.get("neighbours"), cfg=cfg)
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def _metrics(total: jax.Array, count: jax.Array) -> tuple[jax.Array, dict]:
    loss = total / jnp.maximum(count, 1.0)
    return loss, {"loss": loss, "bits_per_token": loss / LN2, "tokens": count}


def loss_fn(params: Any, cfg: ModelConfig, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """Mean masked next-token loss (nats) over the batch's counted tokens, and its metrics."""
    return _metrics(*_masked_sum(params, cfg, batch))


def _restricted(params: Any, trainable_mask: Any | None) -> tuple[Any, Callable[[Any], Any]]:
    """(the leaves to differentiate, a function rebuilding the full params from them).

    No mask: all params, unchanged. With a mask: the list of trainable leaves; the frozen leaves
    are closed over as constants, so autodiff never forms their weight gradients."""
    if trainable_mask is None:
        return params, lambda wrt: wrt
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keep = jax.tree_util.tree_leaves(trainable_mask)
    if len(keep) != len(leaves):
        raise ValueError(f"trainable_mask has {len(keep)} leaves, the params {len(leaves)}")

    def rebuild(wrt: list) -> Any:
        it = iter(wrt)
        return treedef.unflatten([next(it) if k else leaf for leaf, k in zip(leaves, keep)])

    return [leaf for leaf, k in zip(leaves, keep) if k], rebuild


def expand_grads(params: Any, grads: Any, trainable_mask: Any | None) -> Any:
    """Gradients of the trainable leaves (a list, from `loss_and_grads` with a mask) as a tree shaped
    like `params`, zeros at the frozen leaves (the optimizer's frozen branch ignores them)."""
    if trainable_mask is None:
        return grads
    leaves, treedef = jax.tree_util.tree_flatten(params)
    it = iter(grads)
    return treedef.unflatten([next(it) if k else jnp.zeros_like(leaf)
                              for leaf, k in zip(leaves, jax.tree_util.tree_leaves(trainable_mask))])


def loss_and_grads(params: Any, cfg: ModelConfig, batch: dict[str, jax.Array],
                   microbatches: int = 1, trainable_mask: Any | None = None) -> tuple[tuple[jax.Array, dict], Any]:
    """((loss, metrics), grads) of `loss_fn` on the whole batch. With microbatches > 1 the batch
    is cut into that many microbatches (rows i, i+M, i+2M, ...: each keeps its share on every
    device), run one after the other under lax.scan, and their summed losses and gradients are
    divided by the whole batch's token count: the same update as one pass, in less memory.

    trainable_mask (retrofit): grads are those of the True leaves only, as a list in tree-leaf
    order (`expand_grads` makes the full tree); None: grads of every param, as a tree."""
    wrt, rebuild = _restricted(params, trainable_mask)

    def masked_sum(w, batch):
        return _masked_sum(rebuild(w), cfg, batch)

    if microbatches == 1:
        return jax.value_and_grad(lambda w, b: _metrics(*masked_sum(w, b)), has_aux=True)(wrt, batch)
    b = batch["tokens"].shape[0]
    if b % microbatches:
        raise ValueError(f"batch {b} does not split into {microbatches} microbatches")
    split = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(b // microbatches, microbatches, *x.shape[1:]), 0, 1),
                         batch)

    def accumulate(carry, micro):
        (total, count), grads = carry
        (t, c), g = jax.value_and_grad(masked_sum, has_aux=True)(wrt, micro)
        return ((total + t, count + c), jax.tree.map(jnp.add, grads, g)), None

    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    ((total, count), grads), _ = jax.lax.scan(accumulate, (zero, jax.tree.map(jnp.zeros_like, wrt)), split)
    return _metrics(total, count), jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)


# -- steps -------------------------------------------------------------------------------

def train_step(state: TrainState, batch: dict[str, jax.Array], *, cfg: ModelConfig,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule | None = None,
               microbatches: int = 1, trainable_mask: Any | None = None) -> tuple[TrainState, dict]:
    """One forward + backward (over `microbatches` microbatches) + optimizer update, skipped if the
    loss or gradients are not finite.

    trainable_mask: the optimizer's (retrofit); only those leaves are differentiated.
    Metrics: loss, bits_per_token, tokens, grad_norm (of the trained leaves' gradients, before
    clipping: the norm clipping compares with clip_norm), skipped (0/1) and, given the optimizer's
    `schedule`, learning_rate (the rate this step used)."""
    (loss, metrics), grads = loss_and_grads(state.params, cfg, batch, microbatches, trainable_mask)
    grad_norm = optax.tree.norm(grads)
    grads = expand_grads(state.params, grads, trainable_mask)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    # A zero update keeps the parameter itself (bit for bit, even -0.0): frozen params never move.
    params = jax.tree_util.tree_map(lambda p, u: jnp.where(ok & (u != 0), p + u.astype(p.dtype), p),
                                    state.params, updates)
    opt_state = jax.tree_util.tree_map(lambda new, old: jnp.where(ok, new, old), new_opt, state.opt_state)
    bad = (~ok).astype(jnp.int32)
    metrics = dict(metrics, grad_norm=grad_norm, skipped=bad)
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step - state.skipped), jnp.float32)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           skipped=state.skipped + bad, bad_in_a_row=(state.bad_in_a_row + 1) * bad)
    return new_state, metrics


def make_sharded_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                            mesh: jax.sharding.Mesh, state_shardings: TrainState,
                            schedule: optax.Schedule | None = None, microbatches: int = 1,
                            trainable_mask: Any | None = None) -> Callable:
    """`step(state, batch) -> (state, metrics)`: jitted with in/out shardings, the state donated.

    Batches must be global arrays split over data x fsdp (`mesh.global_batch`); metrics come
    back replicated."""
    fn = functools.partial(train_step, cfg=cfg, optimizer=optimizer, schedule=schedule, microbatches=microbatches,
                           trainable_mask=trainable_mask)
    jitted = jax.jit(fn, in_shardings=(state_shardings, batch_sharding(mesh)),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
    return on_mesh(jitted, mesh)
