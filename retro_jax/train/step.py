"""Loss, optimizer and the jitted train/eval steps (pure functions of (state, batch)).

A batch is a dict of arrays:
  tokens     int32 [B, N]    inputs
  targets    int32 [B, N]    next tokens
  loss_mask  float32 [B, N]  1 where the target counts (0 on padding)
  neighbours int32 [B, ceil(N/m), K, 2m]   optional; absent = retrieval off
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from retro_jax.config import ModelConfig
from retro_jax.model.retro import Retro

LN2 = math.log(2.0)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_optimizer(learning_rate: float | optax.Schedule = 2e-4, weight_decay: float = 0.1,
                   clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
    """AdamW (paper §C.1: weight decay 0.1), with optional global-norm gradient clipping."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


def cross_entropy(logits_BxNxV: jax.Array, targets_BxN: jax.Array,
                  mask_BxN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses in nats, number of counted tokens)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits_BxNxV.astype(jnp.float32), targets_BxN)
    mask = mask_BxN.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def loss_fn(params: Any, cfg: ModelConfig, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    logits = Retro(cfg).apply({"params": params}, batch["tokens"], batch.get("neighbours"))
    total, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    loss = total / jnp.maximum(count, 1.0)
    return loss, {"loss": loss, "bits_per_token": loss / LN2, "tokens": count}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, cfg: ModelConfig,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One forward + backward + optimizer update."""
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, cfg, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, cfg: ModelConfig) -> dict:
    return loss_fn(params, cfg, batch)[1]
