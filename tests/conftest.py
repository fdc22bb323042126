"""Test setup: 8 fake CPU devices (for sharding tests), set before JAX is first used."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by XLA:CPU compiles of tiny models: skip LLVM's heavy optimisation
# passes (about 2x faster compiles; numerics are unchanged, runtime is irrelevant here).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
