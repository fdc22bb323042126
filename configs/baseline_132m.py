"""The `baseline-132m` preset (see retro_jax/config.py). `retro-jax info --config baseline-132m`."""

from retro_jax.config import experiment_config


def get_config():
    return experiment_config("baseline-132m")
