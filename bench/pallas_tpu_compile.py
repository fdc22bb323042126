"""Compile the Pallas TPU relative attention (forward + backward, under jit and grad) ahead of
time for real TPU slices and print XLA's memory analysis per device; no TPU is needed, only
libtpu (the TPU compiler), through jax.experimental.topologies.

    python bench/pallas_tpu_compile.py [--seq 2048] [--heads 8] [--head-dim 128]
        [--batch-per-chip 1] [--cases causal,cca] [--dtypes float32,bfloat16]
        [--chips v5e,v5p,v6e] [--impls pallas,blocked]

Each row: the kernel at decoder causal self-attention (and CCA's shape: 64 queries against
2 neighbours of 128 keys, offset 63) on a 4-chip slice of v5e, v5p and v6e, the batch split over
the chips with shard_map (a Pallas call is one kernel per device), float32 and bfloat16;
`--impls pallas,blocked` adds the pure-JAX blocked_attention at the same shapes. Exits 0 with one
line when libtpu is not installed; 1 when a compile failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SLICES = [("v5e", "v5e:2x2"), ("v5p", "v5p:2x2x1"), ("v6e", "v6e:2x2")]


def _case(name, n, m, heads, dh):
    """(kwargs for the kernel, q_len, k_len, C) of one attention of the model."""
    from retro_jax.model.blocked_attention import distance_span

    if name == "causal":
        lay, q_len, k_len = dict(causal=True), n, n
    else:  # CCA: a chunk's m queries at offset m-1 against k=2 neighbours of 2m tokens
        lay, q_len, k_len = dict(q_offset=m - 1, k_period=2 * m), m, 4 * m
    r_base, c = distance_span(q_len, k_len, **lay)
    return dict(lay, r_base=r_base), q_len, k_len, c


def _compile(devices, case, dtype, args, impl):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from retro_jax.model.blocked_attention import blocked_relative_attention
    from retro_jax.model.pallas_attention_tpu import relative_attention_tpu

    attend = relative_attention_tpu if impl == "pallas" else blocked_relative_attention

    mesh = Mesh(devices, ("data",))
    kwargs, q_len, k_len, c = _case(case, args.seq, 64, args.heads, args.head_dim)
    b = len(devices) * args.batch_per_chip * (1 if case == "causal" else args.seq // 64)
    h, dh = args.heads, args.head_dim

    def local(q, k, v, u, w, r, ct):
        def f(q, k, v, u, w, r):
            out = attend(q, k, v, u, w, r, **kwargs)
            return jnp.sum(out.astype(jnp.float32) * ct)
        loss, grads = jax.value_and_grad(f, argnums=range(6))(q, k, v, u, w, r)
        # u, v bias and r are shared across the batch: their gradients are summed over it.
        return loss[None], grads[:3] + tuple(jax.lax.psum(g, "data") for g in grads[3:])

    bsp, rep = P("data"), P()
    step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(bsp,) * 3 + (rep,) * 3 + (bsp,),
                                 out_specs=(bsp, (bsp,) * 3 + (rep,) * 3), check_vma=False))
    sds = lambda shape, spec, dt=dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dt, sharding=NamedSharding(mesh, spec))
    shapes = (sds((b, q_len, h, dh), bsp), sds((b, k_len, h, dh), bsp),
              sds((b, k_len, h, dh), bsp), sds((h, dh), rep), sds((h, dh), rep),
              sds((c, h, dh), rep), sds((b, q_len, h, dh), bsp, jnp.float32))
    t0 = time.perf_counter()
    compiled = step.lower(*shapes).compile()
    return compiled, time.perf_counter() - t0, b, q_len, k_len


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch-per-chip", type=int, default=1)
    ap.add_argument("--cases", default="causal,cca")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--chips", default="v5e,v5p,v6e")
    ap.add_argument("--impls", default="pallas",
                    help="pallas (this kernel), blocked (the pure-JAX blocks, to compare)")
    args = ap.parse_args()
    if importlib.util.find_spec("libtpu") is None:
        print("libtpu is not installed: no TPU compiler here, nothing compiled "
              "(pip install 'jax[tpu]==0.10.2' in a separate venv)")
        return 0
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    print(f"jax {jax.__version__}, libtpu {importlib.metadata.version('libtpu')}")
    print("| chip | slice | impl | case | dtype | B x Q x K | compile s | args MiB | temp MiB "
          "| out MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for chip, name in [s for s in SLICES if s[0] in args.chips.split(",")]:
        try:
            devices = topologies.get_topology_desc(name, platform="tpu").devices
        except Exception as e:  # noqa: BLE001 - a topology this libtpu does not know
            print(f"| {chip} | {name} | - | - | - | no topology: {str(e).splitlines()[0][:120]} |")
            continue
        for case, dt, impl in itertools.product(args.cases.split(","), args.dtypes.split(","),
                                            args.impls.split(",")):
            try:
                compiled, secs, b, q_len, k_len = _compile(devices, case, jnp.dtype(dt),
                                                           args, impl)
            except Exception as e:  # noqa: BLE001 - report the compiler's first line
                failed += 1
                print(f"| {chip} | {name} | {impl} | {case} | {dt} | - | FAILED: "
                      f"{str(e).splitlines()[0][:300]} |")
                continue
            mem = compiled.memory_analysis()
            mib = lambda x: f"{x / 2**20:.1f}"  # noqa: E731
            print(f"| {chip} | {name} ({len(devices)} devices) | {impl} | {case} | {dt} | "
                  f"{b} x {q_len} x {k_len} | {secs:.1f} | "
                  f"{mib(mem.argument_size_in_bytes)} | {mib(mem.temp_size_in_bytes)} | "
                  f"{mib(mem.output_size_in_bytes)} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
