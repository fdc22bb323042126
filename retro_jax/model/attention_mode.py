"""Which computation serves RelativeAttention's scores: `model.attention` = auto | dense | blocked | pallas.

Every mode computes the same function (exactly, not an approximation), so parameters trained
with one load, evaluate, export and generate with any other:
- dense: the [B, H, Q, K] scores in one piece (layers.skew over the whole table);
- blocked: blocked_attention.py, pure JAX, block by block with an online softmax, masked causal
  blocks skipped, a recomputing backward: never an [N, N] tensor, forward or backward;
- pallas: the same schedule as a Pallas kernel, Mosaic on TPU (pallas_attention_tpu.py) or
  Triton on GPU (pallas_attention_gpu.py). On CPU it runs only in Pallas interpret mode, asked for
  with RETRO_JAX_PALLAS_INTERPRET=tpu|gpu (which kernel to interpret): for tests, not for speed;
- auto: blocked for long causal self-attention, dense elsewhere (see AUTO_BLOCKED_FROM).

The backend is the platform the program is compiled for: `jax.default_backend()`, or the one a
caller sets with `compile_for` (retro-jax plan compiles for TPU slices on a CPU host).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from typing import Iterator

import jax

from retro_jax.config import ATTENTION_MODES as MODES
INTERPRET_ENV = "RETRO_JAX_PALLAS_INTERPRET"
_PALLAS_PLATFORMS = ("tpu", "gpu")
# auto: blocked for causal self-attention from AUTO_BLOCKED_FROM tokens, dense below it and for
# the model's small windows (the encoder's 2m x 2m, CCA's m x k*2m, the encoder's k*2m x m).
# Blocked ran faster on this 2-core CPU at every length from 128 (`bench/train_step.py --modes`:
# causal 0.29-0.47x dense's time, the encoder 0.54-0.8x, CCA equal), but with blocked in every
# call the test suite of tiny models (128-256 tokens) ran 19% of its tests in 18 minutes, against
# 16.5 minutes for all of them with dense: our reading (not profiled) is compile time, which short
# runs at short lengths, where dense's N x N is small, do not buy back. Blocked's memory is linear at any length. On GPU and TPU nothing was measured
# (no accelerator was lent to this work), so auto never picks the Pallas kernels, which have been
# checked against dense only in interpret mode.
AUTO_BLOCKED_FROM = 512

# The Mosaic kernel rotates each row of a tile by its own offset (pltpu.roll with a stride);
# Mosaic lowers that only from TPU v5 on ("only supported in TPU v5+", seen compiling for v4-8).
PALLAS_TPU_FROM = 5

_platform: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "retro_jax_platform", default=None)


@contextlib.contextmanager
def compile_for(platform: str, device_kind: str | None = None) -> Iterator[None]:
    """Within this block, attention is traced for `platform` (cpu, gpu, tpu), on devices of
    `device_kind` (jax's Device.device_kind, e.g. "TPU v4") when known."""
    token = _platform.set((platform, device_kind))
    try:
        yield
    finally:
        _platform.reset(token)


def platform() -> str:
    """The platform the attention is being traced for."""
    set_ = _platform.get()
    return set_[0] if set_ else jax.default_backend()


def device_kind() -> str | None:
    """The kind of device the attention is being traced for (None when compile_for left it open)."""
    set_ = _platform.get()
    return set_[1] if set_ else jax.devices()[0].device_kind


def tpu_generation(kind: str | None) -> int | None:
    """5 for "TPU v5 lite" or "TPU v5p", 4 for "TPU v4", 7 for "TPU7x"; None if not a TPU kind."""
    m = re.match(r"TPU\s*v?(\d+)", kind or "")
    return int(m.group(1)) if m else None


def interpret_kernel() -> str | None:
    """The kernel (tpu or gpu) RETRO_JAX_PALLAS_INTERPRET asks to run in interpret mode, or None."""
    value = os.environ.get(INTERPRET_ENV, "").strip().lower()
    if value and value not in _PALLAS_PLATFORMS:
        raise ValueError(f"{INTERPRET_ENV}={value!r}: must be tpu or gpu (the Pallas kernel to "
                         "interpret on this CPU), or unset")
    return value or None


def check(mode: str, block: int, on: str | None = None, kind: str | None = None) -> None:
    """One-line ValueError when `mode` cannot run on the backend `on` (default: platform()) and
    its devices of `kind` (default: device_kind() when `on` is not given)."""
    if on is None:
        on, kind = platform(), kind or device_kind()
    if mode not in MODES:
        raise ValueError(f"model.attention={mode!r} is not one of {', '.join(MODES)} "
                         f"(backend {on})")
    if block < 1:
        raise ValueError(f"model.attention_block={block} must be >= 1 (mode {mode}, backend {on})")
    if mode == "pallas" and on not in _PALLAS_PLATFORMS and interpret_kernel() is None:
        raise ValueError(f"model.attention=pallas cannot run on backend {on}: its kernels are for "
                         f"tpu and gpu (on a CPU, {INTERPRET_ENV}=tpu|gpu runs one in interpret "
                         "mode, for tests); use auto, dense or blocked")
    generation = tpu_generation(kind) if on == "tpu" else None
    if mode == "pallas" and generation is not None and generation < PALLAS_TPU_FROM:
        raise ValueError(f"model.attention=pallas cannot run on backend tpu ({kind}): the Mosaic kernel's "
                         f"per-row rotate needs TPU v{PALLAS_TPU_FROM} or newer; use auto, dense or blocked")


def resolve(mode: str, *, causal: bool, k_len: int) -> str:
    """The computation one call uses: dense, blocked or pallas (auto resolved; see AUTO_BLOCKED_FROM)."""
    if mode != "auto":
        return mode
    return "blocked" if causal and k_len >= AUTO_BLOCKED_FROM else "dense"
