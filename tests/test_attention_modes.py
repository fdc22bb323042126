"""Every model.attention mode computes the dense model's function; bad modes are one line.

A small RETRO (chunk 16, so r = 32) whose attentions all go through the mode under test:
the decoder's causal self-attention over 4 blocks of 16 (N = 64) or over a length that is not a
multiple of the block (48 tokens, blocks of 32), the encoder's self-attention (padded neighbour tokens) and
its cross-attention to the chunk (query periods), and CCA with missing neighbours and missing
continuation tokens. Errors are relative to the largest entry of the reference, per tensor:
max |mode - dense| / max |dense| <= 1e-5 in float32. The Pallas kernels run in interpret mode
(RETRO_JAX_PALLAS_INTERPRET).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.config import ModelConfig
from retro_jax.model import attention_mode
from retro_jax.model.retro import Retro

from test_decode import _decode_all, _params

TOL = 1e-5
# Layer 2 holds CCA (it runs the encoder); scanned, layer 3 runs under nn.scan.
SMALL = dict(name="modes", vocab_size=64, d_model=32, num_layers=3, num_heads=2, head_dim=16, d_ff=64,
             chunk_size=16, num_neighbours=2, cca_layers=(2,), enc_d_model=32, enc_num_layers=1,
             enc_num_heads=2, enc_head_dim=16, enc_d_ff=64, scan_start=2, scan_period=1,
             cca_zero_init=False)
KERNELS = {"tpu": "retro_jax.model.pallas_attention_tpu", "gpu": "retro_jax.model.pallas_attention_gpu"}


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw})


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _inputs(cfg: ModelConfig, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (2, n), dtype=np.int32)
    l, r = -(-n // cfg.chunk_size), cfg.neighbour_len
    nb = rng.integers(0, cfg.vocab_size, (2, l, cfg.num_neighbours, r), dtype=np.int32)
    nb[0, 1, 1] = -1  # an empty neighbour slot
    nb[1, 1, :, 21:] = -1  # continuations cut by a document's end
    nb[1, l - 1] = -1  # a chunk with no neighbour at all: CCA is the identity there
    return jnp.asarray(tokens), jnp.asarray(nb)


def _logits_and_grads(cfg: ModelConfig, params, tokens, nb):
    model = Retro(cfg)
    ct = jax.random.normal(jax.random.key(7), (*tokens.shape, cfg.vocab_size))

    def loss(p):
        return jnp.sum(model.apply({"params": p}, tokens, nb).astype(jnp.float32) * ct)

    return jax.jit(model.apply)({"params": params}, tokens, nb), jax.jit(jax.grad(loss))(params)


@functools.lru_cache(maxsize=None)
def _dense_reference(scan: bool, n: int):
    """(params, tokens, neighbours, (logits, grads)) of the dense model, once per layout."""
    cfg = _cfg(attention="dense", scan_layers=scan)
    params = _params(cfg)
    tokens, nb = _inputs(cfg, n)
    return params, tokens, nb, _logits_and_grads(cfg, params, tokens, nb)


@pytest.fixture
def kernel(request, monkeypatch):
    """The Pallas kernel to interpret on this CPU (pallas modes only)."""
    which = getattr(request, "param", None)
    if which:
        monkeypatch.setenv(attention_mode.INTERPRET_ENV, which)
    if which == "tpu":
        # A whole model's gradient through the interpreted TPU kernel (host callbacks inside)
        # crashes when read back from JAX's persistent compilation cache (segfault, jax 0.10.2):
        # such programs are not written to it.
        was = jax.config.jax_persistent_cache_min_compile_time_secs
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
        yield which
        jax.config.update("jax_persistent_cache_min_compile_time_secs", was)
        return
    yield which


# (n, block): 4 query/key blocks of the decoder, or 1.5 (48 is no multiple of 32).
# Each mode: unrolled at a multiple of the block, scanned at a length that is not one.
CASES = [(k, False, 64, 16) for k in ("blocked", "tpu", "gpu")] + [(k, True, 48, 32) for k in ("blocked", "tpu", "gpu")]


@pytest.mark.parametrize("kernel,scan,n,block", [
    pytest.param(None if k == "blocked" else k, s, n, blk,
                 id=f"{'blocked' if k == 'blocked' else 'pallas-' + k}-{'scanned' if s else 'unrolled'}-{n}")
    for k, s, n, blk in CASES], indirect=["kernel"])
def test_every_mode_computes_the_dense_logits_and_gradients(kernel, scan, n, block):
    if kernel and importlib.util.find_spec(KERNELS[kernel]) is None:
        pytest.skip(f"{KERNELS[kernel]} not present")
    mode = "pallas" if kernel else "blocked"
    params, tokens, nb, (want_logits, want_grads) = _dense_reference(scan, n)
    got_logits, got_grads = _logits_and_grads(_cfg(attention=mode, scan_layers=scan, attention_block=block),
                                              params, tokens, nb)
    assert _rel_err(got_logits, want_logits) <= TOL
    flat_got = jax.tree_util.tree_leaves_with_path(got_grads)
    assert len(flat_got) == len(jax.tree.leaves(want_grads))
    for (path, g), w in zip(flat_got, jax.tree.leaves(want_grads)):
        assert np.abs(w).max() > 0, jax.tree_util.keystr(path)  # every parameter is live
        assert _rel_err(g, w) <= TOL, (jax.tree_util.keystr(path), _rel_err(g, w))


def test_blocked_bfloat16_is_within_bfloat16_rounding_of_the_float32_model():
    """In bfloat16 the blocked model is no further from the float32 model than the dense bfloat16
    model is (twice its error, plus bfloat16's unit roundoff)."""
    params = _params(_cfg())
    tokens, nb = _inputs(_cfg(), 64, seed=1)
    truth = jax.jit(Retro(_cfg(attention="dense")).apply)({"params": params}, tokens, nb)
    errs = {m: _rel_err(jax.jit(Retro(_cfg(attention=m, dtype="bfloat16")).apply)(
        {"params": params}, tokens, nb), truth) for m in ("dense", "blocked")}
    assert errs["dense"] > 0
    assert errs["blocked"] <= 2 * errs["dense"] + 2 ** -8, errs


def test_decode_steps_of_a_blocked_model_equal_its_full_forward():
    """The cached decode step (dense by nature: one row against the cache) computes what the
    blocked full forward computes at every position, neighbours included."""
    cfg = _cfg(attention="blocked", attention_block=16)
    params = _params(cfg)
    tokens, nb = _inputs(cfg, 40, seed=2)
    full = np.asarray(jax.jit(Retro(cfg).apply)({"params": params}, tokens, nb))
    cached = _decode_all(params, cfg, np.asarray(tokens), np.asarray(nb))
    np.testing.assert_allclose(cached, full, atol=2e-4, rtol=2e-4)


def test_auto_resolves_to_blocked_for_long_causal_attention_and_never_to_pallas():
    n = attention_mode.AUTO_BLOCKED_FROM
    assert attention_mode.resolve("auto", causal=True, k_len=n) == "blocked"
    assert attention_mode.resolve("auto", causal=True, k_len=n - 1) == "dense"
    for causal in (False, True):
        for k_len in (16, 256, 4096, 65536):
            assert attention_mode.resolve("auto", causal=causal, k_len=k_len) in ("dense", "blocked")
    assert attention_mode.resolve("auto", causal=False, k_len=65536) == "dense"  # the small windows
    for mode in ("dense", "blocked", "pallas"):
        assert attention_mode.resolve(mode, causal=True, k_len=16) == mode


@pytest.mark.parametrize("kw,needle", [
    (dict(attention="flash"), "model.attention='flash' is not one of auto, dense, blocked, pallas"),
    (dict(attention="blocked", attention_block=12), "model.attention_block=12"),
])
def test_a_bad_mode_or_block_is_one_line_from_the_config(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")) as e:
        _cfg(**kw)
    assert "\n" not in str(e.value)


def test_pallas_on_cpu_outside_interpret_mode_is_one_line_naming_mode_and_backend(monkeypatch):
    monkeypatch.delenv(attention_mode.INTERPRET_ENV, raising=False)
    with pytest.raises(ValueError) as e:
        attention_mode.check("pallas", 128, "cpu")
    msg = str(e.value)
    assert "pallas" in msg and "backend cpu" in msg and "\n" not in msg
    attention_mode.check("pallas", 128, "tpu")  # the kernels' own platforms pass
    attention_mode.check("pallas", 128, "gpu")
    monkeypatch.setenv(attention_mode.INTERPRET_ENV, "tpu")
    attention_mode.check("pallas", 128, "cpu")  # interpret mode, for tests
    monkeypatch.setenv(attention_mode.INTERPRET_ENV, "tensorcore")
    with pytest.raises(ValueError, match="must be tpu or gpu"):
        attention_mode.check("pallas", 128, "cpu")


def test_pallas_on_a_tpu_before_v5_is_one_line_naming_mode_backend_and_chip():
    """Mosaic lowers the kernel's strided row rotate only from TPU v5 on (compiling for v4-8
    failed deep in the compiler); the refusal comes first, from the device kind."""
    for kind in ("TPU v4", "TPU v3", "TPU v2"):
        with pytest.raises(ValueError) as e:
            attention_mode.check("pallas", 128, "tpu", kind)
        msg = str(e.value)
        assert "pallas" in msg and "backend tpu" in msg and kind in msg and "\n" not in msg
        for other in ("auto", "dense", "blocked"):
            attention_mode.check(other, 128, "tpu", kind)
    for kind in ("TPU v5 lite", "TPU v5p", "TPU v5", "TPU v6 lite", "TPU7x", None):
        attention_mode.check("pallas", 128, "tpu", kind)
    with attention_mode.compile_for("tpu", "TPU v4"):  # what the model's own check sees in plan
        assert attention_mode.platform() == "tpu" and attention_mode.device_kind() == "TPU v4"
        with pytest.raises(ValueError, match="TPU v4"):
            attention_mode.check("pallas", 128)
    assert attention_mode.platform() == jax.default_backend()


@pytest.mark.parametrize("argv", [
    ["plan", "--config", "tiny", "--topology", "cpu:1", "--config.model.attention=pallas"],
    ["plan", "--config", "tiny", "--topology", "cpu:1", "--config.model.attention=sparse"],
    ["plan", "--config", "tiny", "--topology", "cpu:1", "--config.model.attention_block=48"],
])
def test_the_cli_refuses_a_mode_the_backend_cannot_run_in_one_line_before_compiling(argv):
    env = {k: v for k, v in __import__("os").environ.items() if k != attention_mode.INTERPRET_ENV}
    p = subprocess.run([sys.executable, "-m", "retro_jax.cli", *argv], capture_output=True, text=True,
                       env=env, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and "attention" in lines[0] and p.stdout == ""
    if "pallas" in argv[-1]:
        assert "backend cpu" in lines[0]


def test_the_mode_is_recorded_and_every_mode_has_the_same_parameters():
    """config.json round trip: the mode travels with the model config, and the parameter tree
    does not depend on it (so any mode reads another mode's checkpoint or export)."""
    cfg = _cfg(attention="blocked")
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.attention == "blocked" and back.attention_block == 128
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("attention")}
    assert ModelConfig.from_dict(old).attention == "auto"  # a config.json from before the switch
    from retro_jax.model import abstract_params
    shapes = {m: jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(_cfg(attention=m)))
              for m in ("dense", "blocked", "auto")}
    assert shapes["dense"] == shapes["blocked"] == shapes["auto"]  # and equal logits: the test above


def test_a_pallas_kernel_under_a_mesh_runs_per_device_and_equals_dense(monkeypatch):
    """Under a 2 (data) x 2 (tensor) mesh the kernel runs in shard_map on each device's rows and
    heads; the output and the gradients of every parameter (u, v and the table's W_R summed over
    the batch shards) equal the dense module's."""
    import flax.linen as nn

    from retro_jax.model.relative_attention import RelativeAttention
    from retro_jax.runtime.mesh import LOGICAL_AXIS_RULES, make_mesh

    monkeypatch.setenv(attention_mode.INTERPRET_ENV, "gpu")
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 64, 32)), jnp.float32)
    valid = jnp.asarray(rng.random((4, 64)) > 0.2)
    params = nn.unbox(RelativeAttention(2, 16).init(jax.random.key(0), x, x, valid))
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)

    def grad(mode):
        mod = RelativeAttention(2, 16, attention=mode, block=16)
        f = lambda p, x: jnp.sum(jnp.sin(mod.apply(p, x, x, valid, causal=True)))  # noqa: E731
        return jax.value_and_grad(f, argnums=(0, 1))

    want = jax.jit(grad("dense"))(params, x)
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        assert "shard_map" in str(jax.make_jaxpr(grad("pallas"))(params, x))
        got = jax.jit(grad("pallas"))(params, x)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert _rel_err(g, w) <= TOL, (jax.tree_util.keystr(path), _rel_err(g, w))
