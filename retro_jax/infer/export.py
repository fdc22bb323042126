"""Export a trained model's parameters for inference, and load them back without training code.

An export folder (EXPORT_DIR) holds:
  model.safetensors   one tensor per parameter, named by its path in the unrolled parameter tree
                      joined with dots (`embed.embedding`, `layer_3.attn.wq`, `layer_3.cca.attn.wk`,
                      `encoder.layer_1_ffw.wi`, `final_norm.scale`, `unembed`): scanned layers are
                      unstacked (model/layout.py), so the file does not depend on how they were run
  config.json         the model config (scan_layers off), the tensor dtype, the step exported,
                      the tokenizer's checksum and the database's identity
  tokenizer.model     the SentencePiece model the database (and so the model) was built with
  README.md           what this is and how to load it

`load_exported(EXPORT_DIR) -> (ModelConfig, params)` reads safetensors and JSON only (no Orbax,
no pickle, no training state) and checks every tensor's name, shape and dtype against the config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import ModelConfig, model_config, read_workdir_config
from retro_jax.model import abstract_params
from retro_jax.model.layout import unstack_layers

FORMAT = "retro-jax-export"
VERSION = 1
WEIGHTS, CONFIG, TOKENIZER, README = "model.safetensors", "config.json", "tokenizer.model", "README.md"
DTYPES = ("float32", "bfloat16")


class ExportError(ValueError):
    """An export folder that cannot be loaded: missing, truncated, or not matching its config."""


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted name: leaf} of a nested parameter dict."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def unflatten(tensors: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, v in tensors.items():
        *path, leaf = name.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _host_params(workdir: Path, cfg: ModelConfig, step: int | None) -> tuple[int, dict[str, Any]]:
    """(step, params as host numpy arrays in the unrolled layout) of a workdir's checkpoint, restored
    onto this process's devices (whatever mesh trained it) and gathered."""
    from retro_jax.runtime.checkpoint import checkpoint_steps
    from retro_jax.runtime.mesh import make_mesh
    from retro_jax.runtime.state import restore_params

    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{str(workdir)!r} has no checkpoints to export")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise ValueError(f"--step {step}: {str(workdir)!r} has checkpoints at steps {steps}")
    mesh = make_mesh(data=1, fsdp=len(jax.devices()))
    params = restore_params(workdir, cfg, mesh, step)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    return step, (unstack_layers(params, cfg) if cfg.scan_layers else params)


def export(workdir: str | os.PathLike[str], out: str | os.PathLike[str], step: int | None = None,
           dtype: str = "float32") -> Path:
    """Write EXPORT_DIR `out` from checkpoint `step` (None: the newest) of a training workdir."""
    from safetensors.flax import save_file

    from retro_jax.retrieval.database import MANIFEST, TOKENIZER_FILE, sha256_file

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    workdir, out = Path(workdir), Path(out)
    config = read_workdir_config(workdir)
    cfg = model_config(config)
    db = Path(config.data.db)
    tokenizer = db / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise FileNotFoundError(f"the workdir's database {str(db)!r} has no {TOKENIZER_FILE}: the export needs the "
                                "tokenizer the model was trained with")
    step, params = _host_params(workdir, cfg, step)
    tensors = {k: jnp.asarray(v, dtype) for k, v in flatten(params).items()}
    plain = dataclasses.replace(cfg, scan_layers=False)
    meta = {"format": FORMAT, "version": VERSION, "model": plain.to_dict(), "dtype": dtype, "step": step,
            "workdir": str(workdir.absolute()), "tokenizer": {"file": TOKENIZER, "sha256": sha256_file(tokenizer)},
            "database": {"path": str(db.absolute()), "manifest_sha256": sha256_file(db / MANIFEST),
                         "tokenizer_sha256": config.data.tokenizer_sha256}}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    shutil.copyfile(tokenizer, out / TOKENIZER)
    (out / README).write_text(_readme(plain, meta, len(tensors), out))
    tmp.chmod(0o644)  # safetensors writes 0600
    tmp.replace(out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(meta, indent=2))  # last: its presence means the export is whole
    return out


def _readme(cfg: ModelConfig, meta: dict[str, Any], n_tensors: int, out: Path) -> str:
    return f"""# {cfg.name}, exported by retro-jax

Parameters of the training run `{meta['workdir']}` at step {meta['step']}, for inference: no optimizer
state. `{WEIGHTS}` holds {n_tensors} {meta['dtype']} tensors, one per parameter, named by the path in the
model's (unrolled) parameter tree joined with dots, e.g. `layer_1.attn.wq` ([d_model, heads, head_dim]).
`{CONFIG}` has the model config (`model`), the step, and the identity of the retrieval database the
model was trained with (`database`: path, sha256 of its manifest.json, tokenizer sha256);
`{TOKENIZER}` is its SentencePiece tokenizer.

Load (no Orbax, no pickle):

    from retro_jax import load_exported, Retro
    cfg, params = load_exported("{out}")
    logits = Retro(cfg).apply({{"params": params}}, tokens, neighbours)

Generate with live retrieval:

    retro-jax generate --model {out} --db {meta['database']['path']} --prompt "..."

Any database built with the same tokenizer can serve retrieval; if a prompt's own text is in the
database, the model can read it back (leakage): continuations then copy rather than generalise.
"""


def load_exported(export_dir: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """(model config, params) of an export folder: every tensor's name, shape and dtype checked
    against the config; ExportError on a missing, truncated or mismatched file."""
    from safetensors import SafetensorError
    from safetensors.flax import load_file

    d = Path(export_dir)
    meta = read_export_config(d)
    cfg = ModelConfig.from_dict(meta["model"])
    path = d / WEIGHTS
    if not path.is_file():
        raise ExportError(f"{str(d)!r} has no {WEIGHTS}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{str(path)!r} is not a readable safetensors file (truncated or damaged?): {e}") from None
    want = {k: v for k, v in flatten(abstract_params(dataclasses.replace(cfg, scan_layers=False))).items()}
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise ExportError(f"{str(path)!r} does not match its config ({cfg.name}): "
                          f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                          f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name, spec in want.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(spec.shape) or str(got.dtype) != meta["dtype"]:
            raise ExportError(f"{str(path)!r}: tensor {name} is {got.dtype}{list(got.shape)}, the config "
                              f"needs {meta['dtype']}{list(spec.shape)}")
    return cfg, unflatten(tensors)


def read_export_config(export_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of an export folder, checked to be one."""
    path = Path(export_dir) / CONFIG
    if not path.is_file():
        raise ExportError(f"{str(export_dir)!r} has no {CONFIG}: not an export folder (or the export did not finish)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{str(path)!r} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ExportError(f"{str(path)!r} is not a {FORMAT} v{VERSION} config")
    if meta.get("dtype") not in DTYPES:
        raise ExportError(f"{str(path)!r}: unknown dtype {meta.get('dtype')!r}")
    return meta
