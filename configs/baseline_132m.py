"""baseline-132m: the retro-172m decoder without retrieval (Table 2's baseline column)."""

from retro_jax.config import baseline_of, load_config


def get_config():
    return baseline_of(load_config("retro-172m"), "baseline-132m")
