"""Training metrics: one JSON object per logged step in metrics.jsonl, TensorBoard event files,
and a progress bar on the terminal. Everything lands in the workdir."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm


def _plain(v: Any) -> Any:
    """A JSON-able Python scalar from a Python/NumPy/JAX scalar."""
    if isinstance(v, (bool, int, str)):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


class MetricsWriter:
    """Writes metrics.jsonl (appending; on resume, lines past the restored step are dropped so the
    file always describes one uninterrupted run) and TensorBoard events under workdir/tb."""

    def __init__(self, workdir: str | os.PathLike[str], start_step: int, total_steps: int,
                 enabled: bool = True, progress: bool = True) -> None:
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            self._truncate_after(start_step)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tb"), purge_step=start_step + 1)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                         dynamic_ncols=True, disable=not (progress and enabled))

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.path)

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        shown = {k: row[k] for k in ("loss", "lr", "tokens_per_s", "mfu") if k in row}
        self._bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in shown.items()})

    def close(self) -> None:
        self._bar.close()
        if self._tb is not None:
            self._tb.close()


# Dense bf16 peak FLOP/s per chip, for MFU (vendor datasheets, no sparsity).
_PEAK_BY_KIND = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
                 "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
                 "NVIDIA A100": 312e12}
_measured: dict[str, float] = {}


def peak_flops_per_device() -> float:
    """Peak FLOP/s of one device: the datasheet for known accelerators; on CPU (and unknown
    kinds) a dense f32 matmul measured once on this machine."""
    kind = jax.devices()[0].device_kind
    for name, peak in _PEAK_BY_KIND.items():
        if kind.startswith(name):
            return peak
    if kind not in _measured:
        import time

        import jax.numpy as jnp

        n = 1024
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a: a @ a)
        f(a).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(5):
            f(a).block_until_ready()
        # The fake CPU devices of one host share its cores: divide the host's rate among them.
        _measured[kind] = 5 * 2 * n ** 3 / (time.perf_counter() - t0) / max(1, jax.local_device_count())
    return _measured[kind]
