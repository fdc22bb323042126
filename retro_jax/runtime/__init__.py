"""The layer under every stage: the mesh and its rules (mesh.py), the train state, its shardings and
restoring from a workdir (state.py), every Orbax call (checkpoint.py), and the sharded forward pass
(forward.py); the config is retro_jax/config.py. Stages import from here, never from each other.
"""
