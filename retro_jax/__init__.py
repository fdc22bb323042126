"""retro-jax: RETRO (Borgeaud et al. 2021) in JAX/Flax.

    from retro_jax import ModelConfig, Retro
    cfg = ModelConfig.from_preset("tiny")
    variables = Retro(cfg).init(rng, tokens, neighbours)
    logits = Retro(cfg).apply(variables, tokens, neighbours)
"""

from retro_jax.config import ModelConfig
from retro_jax.model import init_params
from retro_jax.model.retro import Retro

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Retro", "init_params", "__version__"]
