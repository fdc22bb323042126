"""baseline-368m: the retro-425m decoder without retrieval (Table 2's baseline column)."""

from retro_jax.config import baseline_of, load_config


def get_config():
    return baseline_of(load_config("retro-425m"), "baseline-368m")
