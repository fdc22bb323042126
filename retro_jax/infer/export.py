"""Export a trained model's parameters for inference, and load them back without training code.

An export folder (EXPORT_DIR) holds:
  model.safetensors   one tensor per parameter, named by its path in the unrolled parameter tree
                      joined with dots (`embed.embedding`, `layer_3.attn.wq`, `layer_3.cca.attn.wk`,
                      `encoder.layer_1_ffw.wi`, `final_norm.scale`, `unembed`): scanned layers are
                      unstacked (model/layout.py), so the file does not depend on how they were run
  config.json         the model config (scan_layers off), the tensor dtype, the step exported,
                      the tokenizer's checksum and the database's identity
  tokenizer.model     the SentencePiece model the run trained with (WORKDIR/tokenizer.model, copied
                      at train time; for older workdirs, the database's), checked by its sha256
  README.md           what this is and how to load it

The folder is written beside EXPORT_DIR (`.NAME.tmp-HOST-PID`), fsynced and renamed into place, so
EXPORT_DIR only ever appears whole; an existing export is replaced only when asked (`overwrite`).
The parameters are restored as whole host arrays (no mesh: any device count exports any model),
by every process of a multi-process run, and process 0 alone writes.

`load_exported(EXPORT_DIR) -> (ModelConfig, params)` reads safetensors and JSON only (no Orbax,
no pickle, no training state) and checks every tensor's name, shape and dtype against the config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import ModelConfig, model_config, read_workdir_config
from retro_jax.data.processes import process_alive
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


def _checkpoint_step(workdir: Path, step: int | None) -> int:
    """The checkpoint step to export: `step`, or the newest; ValueError naming the steps there are."""
    from retro_jax.runtime.checkpoint import checkpoint_steps

    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{str(workdir)!r} has no checkpoint to export")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise ValueError(f"--step {step}: {str(workdir)!r} has checkpoints at steps {steps}")
    return step


def _host_params(workdir: Path, cfg: ModelConfig, step: int) -> dict[str, Any]:
    """The params of checkpoint `step` as whole host numpy arrays in the unrolled layout, whatever
    mesh trained them; read by every process of a multi-process run."""
    from retro_jax.runtime.state import restore_params_to_host

    params = restore_params_to_host(workdir, cfg, step)
    return unstack_layers(params, cfg) if cfg.scan_layers else params


def _tokenizer_of(workdir: Path, config: Any) -> tuple[Path, str]:
    """(path, sha256) of the tokenizer the run trained with: WORKDIR/tokenizer.model (copied there
    at train time), else (older workdirs) its database's; checked against the sha256 the run recorded."""
    from retro_jax.retrieval.database import TOKENIZER_FILE, sha256_file

    recorded = config.data.get("tokenizer_sha256") or ""
    places = (workdir / TOKENIZER, Path(config.data.db) / TOKENIZER_FILE)
    wrong = []
    for path in places:
        if path.is_file():
            got = sha256_file(path)
            if not recorded or got == recorded:
                return path, got
            wrong.append(f"{str(path)!r} has sha256 {got[:16]}")
    if wrong:
        raise ExportError(f"no tokenizer to export: the run recorded tokenizer sha256 {recorded[:16]}, but "
                          f"{' and '.join(wrong)}")
    raise FileNotFoundError(f"no tokenizer to export: neither {str(places[0])!r} (copied at train time) nor the "
                            f"database's {str(places[1])!r} exists; put the run's tokenizer.model (sha256 "
                            f"{recorded[:16]}) at {str(places[0])!r}")


def _database_identity(config: Any) -> dict[str, Any]:
    """The database the run trained with: the manifest hash the run recorded, else (older workdirs)
    the hash of its manifest when the folder is still there, else None."""
    from retro_jax.retrieval.database import MANIFEST, sha256_file

    db = Path(config.data.db)
    manifest = config.data.get("manifest_sha256") or (sha256_file(db / MANIFEST) if (db / MANIFEST).is_file()
                                                       else None)
    return {"path": str(db.absolute()), "manifest_sha256": manifest,
            "tokenizer_sha256": config.data.get("tokenizer_sha256")}


def _check_destination(out: Path, overwrite: bool) -> None:
    """EXPORT_DIR may be new or an empty folder; an existing export only with `overwrite`; anything
    else is refused (never deleted)."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise FileExistsError(f"{str(out)!r} exists and is not a folder: choose another --out")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{str(out)!r} exists: pass --overwrite to replace it (the new export is written "
                              "beside it and moved into place)")
    try:
        read_export_config(out)
    except ExportError:
        raise FileExistsError(f"{str(out)!r} is not an export folder (no {CONFIG} of a {FORMAT}): refusing to "
                              "replace it; delete it yourself or choose another --out") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _side_folder(out: Path, kind: str, pid: int) -> Path:
    """A sibling of EXPORT_DIR: `.NAME.tmp-HOST-PID` (being written) or `.NAME.old-HOST-PID` (being replaced)."""
    return out.parent / f".{out.name}.{kind}-{socket.gethostname()}-{pid}"


def _remove_stale(out: Path) -> None:
    """Side folders left by exports of this host that were killed (their process is gone): a partial
    one is removed; a replaced export whose successor never arrived is put back in place."""
    for kind in ("old", "tmp"):
        prefix = _side_folder(out, kind, 0).name[:-1]
        for p in sorted(out.parent.iterdir()):
            pid = p.name[len(prefix):]
            if not (p.name.startswith(prefix) and pid.isdigit() and not process_alive(int(pid))):
                continue
            if kind == "old" and not out.exists() and not out.is_symlink():
                os.replace(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the complete `tmp` to `out` (replacing an existing export with `overwrite`)."""
    old = None
    if out.exists():
        _check_destination(out, overwrite)  # again: it may have appeared while we wrote
        old = _side_folder(out, "old", os.getpid())
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write(out: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any], readme: str, tokenizer: Path,
           overwrite: bool) -> None:
    """Write the export into a sibling temp folder, fsync it, then move it into place: EXPORT_DIR
    only ever appears whole (a killed export leaves at most a hidden side folder, removed by the
    next export on this host)."""
    from safetensors.numpy import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = _side_folder(out, "tmp", os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "version": str(VERSION)})
        (tmp / WEIGHTS).chmod(0o644)  # safetensors writes 0600
        shutil.copyfile(tokenizer, tmp / TOKENIZER)
        (tmp / README).write_text(readme)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        for name in (WEIGHTS, TOKENIZER, README, CONFIG, "."):
            _fsync(tmp / name)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _agree(error: Exception | None, what: str) -> None:
    """Every process of a multi-process run calls it (a collective, so also a barrier): `error` is
    raised where it happened, and the processes whose part went well raise an ExportError naming
    the ones that failed, so that no process is left waiting for another. One process: raise `error`."""
    failed = [0] if error is not None else []
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
        failed = np.flatnonzero(flags).tolist()
    if error is not None:
        raise error
    if failed:
        raise ExportError(f"{what} failed on process {', '.join(map(str, failed))}: see its error")


def export(workdir: str | os.PathLike[str], out: str | os.PathLike[str], step: int | None = None,
           dtype: str = "float32", overwrite: bool = False, attention: str | None = None) -> Path:
    """Write EXPORT_DIR `out` from checkpoint `step` (None: the newest) of a training workdir.

    In a multi-process run every process must call it: all check and read the checkpoint (as whole
    host arrays, so no dimension needs to divide the devices), process 0 alone writes, the others
    wait for it and return the same path (or raise if it failed). An existing export is replaced
    only with `overwrite`. attention: the model.attention the export records (default: the run's;
    every mode computes the same function, so it is only the default its users get)."""
    workdir, out = Path(workdir), Path(out)
    error: Exception | None = None
    try:  # checks first, on every process, before anything is read or written
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
        config = read_workdir_config(workdir)
        if attention is not None:
            config.model.attention = attention
        cfg = model_config(config)
        tokenizer, tokenizer_sha256 = _tokenizer_of(workdir, config)
        step = _checkpoint_step(workdir, step)
        _check_destination(out, overwrite)
    except Exception as e:  # noqa: BLE001 - raised by _agree, once the others know
        error = e
    _agree(error, f"exporting {str(workdir)!r}")
    params = _host_params(workdir, cfg, step)
    plain = dataclasses.replace(cfg, scan_layers=False)
    meta = {"format": FORMAT, "version": VERSION, "model": plain.to_dict(), "dtype": dtype, "step": step,
            "workdir": str(workdir.absolute()), "tokenizer": {"file": TOKENIZER, "sha256": tokenizer_sha256},
            "database": _database_identity(config)}
    if jax.process_index() == 0:
        try:
            tensors = {k: np.ascontiguousarray(np.asarray(v).astype(jnp.dtype(dtype)))
                       for k, v in flatten(params).items()}
            _write(out, tensors, meta, _readme(plain, meta, len(tensors), out), tokenizer, overwrite)
        except Exception as e:  # noqa: BLE001 - raised by _agree, once the others know
            error = e
    del params
    _agree(error, f"writing {str(out)!r}")
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
