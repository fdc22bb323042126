"""baseline-1.3b: the retro-1.5b decoder without retrieval (Table 2's baseline column)."""

from retro_jax.config import baseline_of, load_config


def get_config():
    return baseline_of(load_config("retro-1.5b"), "baseline-1.3b")
