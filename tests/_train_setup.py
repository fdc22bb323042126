"""Shared setup of the sharded-training tests.

A small RETRO (the `tiny` widths, 2 decoder layers, one CCA layer, a 1-layer encoder, 256-token
vocabulary: every parameter kind, fast to compile), 3 fixed batches, and an AdamW that trains
every parameter, so every leaf moves and a sharded run is compared with one device on all of
them. The frozen-decoder optimizer (retrofitting: only the encoder and CCA train, the masked
optimizer state) is a separate case, used where freezing is the point.
"""

from __future__ import annotations

import functools

import numpy as np

CFG_KW = dict(vocab_size=256, num_layers=2, cca_layers=(2,), enc_num_layers=1, enc_cross_layers=(1,))
SEQ, BATCH, STEPS, MESH = 128, 8, 3, (2, 2, 2)


def cfg():
    from retro_jax.config import ModelConfig
    return ModelConfig.from_preset("tiny").replace(**CFG_KW)


def batches() -> list[dict[str, np.ndarray]]:
    from _stand_ins import random_batch
    return [random_batch(cfg(), BATCH, SEQ, seed=s) for s in range(STEPS)]


def trainable_mask():
    """True for the retrieval parameters (encoder, CCA), False for the baseline decoder."""
    import jax
    from retro_jax.model import abstract_params
    from retro_jax.model.count import is_retrieval_path
    return jax.tree_util.tree_map_with_path(lambda p, _: is_retrieval_path(tuple(k.key for k in p)),
                                            abstract_params(cfg()))


@functools.lru_cache(maxsize=None)
def optimizer(frozen_decoder: bool = False):
    """(AdamW, its schedule): every parameter trains, or (frozen_decoder) only encoder and CCA."""
    from retro_jax.train.step import make_optimizer, make_schedule
    schedule = make_schedule(1e-3, warmup=1, total=10)
    mask = trainable_mask() if frozen_decoder else None
    return make_optimizer(schedule, trainable_mask=mask), schedule


def param_norm(params) -> float:
    import jax
    import optax
    return float(jax.jit(optax.tree.norm)(params))


def run_sharded(mesh_shape: tuple[int, int, int], devices=None, *, frozen_decoder: bool = False,
                microbatches: int = 1) -> dict:
    """sharded_init + STEPS sharded train steps, each process feeding only its rows."""
    import jax
    from retro_jax.runtime import mesh as mesh_lib
    from retro_jax.runtime.state import sharded_init
    from retro_jax.train.step import make_sharded_train_step

    opt, schedule = optimizer(frozen_decoder)
    mesh = mesh_lib.make_mesh(*mesh_shape, devices=devices)
    state, shardings = sharded_init(cfg(), opt, mesh, jax.random.key(0))
    # Frozen decoder: as `retro-jax train --freeze-decoder` runs it, only the trainable leaves differentiated.
    mask = trainable_mask() if frozen_decoder else None
    step = make_sharded_train_step(cfg(), opt, mesh, shardings, schedule, microbatches=microbatches,
                                   trainable_mask=mask)
    init = jax.device_get(state.params) if jax.process_count() == 1 else None
    rows = mesh_lib.local_batch_slice(BATCH, mesh)
    losses = []
    for b in batches():
        state, metrics = step(state, mesh_lib.global_batch({k: v[rows] for k, v in b.items()}, mesh))
        losses.append(float(metrics["loss"]))
    return {"losses": losses, "param_norm": param_norm(state.params), "state": state,
            "mesh": mesh, "step": step, "shardings": shardings, "init_params": init,
            "rows": [rows.start, rows.stop]}


@functools.lru_cache(maxsize=None)
def run_8_devices(frozen_decoder: bool = False) -> dict:
    """The 1-process x 8-device run on MESH (shared by the test files of one session)."""
    return run_sharded(MESH, frozen_decoder=frozen_decoder)
