"""Test setup: 8 fake CPU devices (for sharding tests), set before JAX is first used."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by XLA:CPU compiles of tiny models: skip LLVM's heavy optimisation
# passes (about 2x faster compiles; numerics are unchanged, runtime is irrelevant here).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# The same programs are compiled again and again: by the `retro-jax` subprocesses of the resume
# tests (a run, then its resumption), and by tests sharing a model. JAX's persistent compilation
# cache (keyed on the program, the flags and the versions) lets each compile happen once per
# suite. Set in the environment, so subprocesses and both xdist workers share it; it lives in
# .pytest_cache (git-ignored), so a fresh clone starts cold.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".pytest_cache", "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


# Multi-process tests (2 processes x 4 CPU devices, gloo collectives) carry
# @pytest.mark.xdist_group("processes") and `make test` runs with --dist loadgroup, so two of
# them never run at once: four such processes on 2 cores skew the processes of one run by more
# than gloo's 30 s rendezvous timeout, which fails a collective (seen in a full suite).


def pytest_collection_modifyitems(session, config, items):
    """Modules holding a slow test run first (each module's tests stay together, so its fixtures
    are set up once): with 2 workers, the suite then ends on short tests instead of one worker
    finishing a long test alone."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)
