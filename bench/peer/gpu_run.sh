#!/usr/bin/env bash
# The training-step comparison (issue 13, item 1) on a GPU machine, both frameworks on the GPU.
# From the repo root, installing nothing: the machine has jax (CUDA), flax, optax and torch
# (CUDA); retro-pytorch 0.3.9 and einops come from .peer_carry/ (bench/peer/make_carry.sh, run
# beforehand where PyPI is reachable, and carried along). Writes $OUT/peer_train_step_gpu.{json,txt}.
#   bash bench/peer/gpu_run.sh            DTYPES=bf16,tf32,f32 SHAPES=A,B PY=python3 to change
set -euo pipefail
OUT=${OUT:-out/bench}
PY=${PY:-python3}
DTYPES=${DTYPES:-bf16,tf32}
SHAPES=${SHAPES:-A,B}
mkdir -p "$OUT"
test -d .peer_carry/retro_pytorch || { echo "no .peer_carry/retro_pytorch: run bench/peer/make_carry.sh and carry .peer_carry" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import jax, flax, optax, ml_collections; print('ours: jax', jax.__version__, jax.devices())"
PYTHONPATH=.peer_carry $PY -c "import torch, einops; print('peer: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$PY bench/peer_train_step.py --device gpu --dtype "$DTYPES" --shapes "$SHAPES" --peer-python "$PY" \
  --peer-path .peer_carry --json "$OUT/peer_train_step_gpu.json" "$@" 2>&1 | tee "$OUT/peer_train_step_gpu.txt"
