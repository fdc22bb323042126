"""The training loop: `retro-jax train` and `retro_jax.train.loop.train`.

Top to bottom: distributed init -> config and database checks (before anything compiles) ->
mesh -> optimizer -> sharded init -> resume (or retrofit init) -> loop (log, validate,
checkpoint, stop on divergence or SIGTERM) -> final checkpoint. The mesh, the state and the
checkpoints come from the runtime layer; validation is a function passed in (the `train` verb
passes `retro_jax.eval.run.make_validator`, so the numbers match `retro-jax eval`).

Resuming restores the newest checkpoint that reads back completely; an unreadable newer one is
named, set aside and skipped, and a workdir whose checkpoints all fail to read is an error,
never a silent fresh start.

Resume guard rails (checked before anything compiles): the run records its database's identity
(the sha256 of its manifest.json) and its tokenizer's sha256 in the workdir's config.json and in
every checkpoint. A resume on another database (another db-subset of the same parent, say: same
size, other neighbours) is refused unless `allow_db_change` (`--allow-db-change`); one on a
database built with another tokenizer is always refused (the token ids would mean other text).
The cosine schedule's horizon (`train.decay_steps`, 0 = `train.steps`) is fixed when the run
starts and recorded, so a resume with a larger --steps continues at the final rate.
The database's tokenizer model is copied into the workdir (WORKDIR/tokenizer.model, checked
against its sha256), so export needs only the workdir.

Exact resume: the checkpoint holds params, optimizer state, step counters and the data
iterator's state; the data order is a pure function of (seed, epoch) and the step is
deterministic, so a run killed at any moment and restarted with the same command continues
from its last complete checkpoint and reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from retro_jax.config import model_config, read_workdir_config, write_workdir_config
from retro_jax.model import abstract_params
from retro_jax.model import attention_mode
from retro_jax.model.count import flops_per_token
from retro_jax.retrieval.database import MANIFEST, TOKENIZER_FILE, Database
from retro_jax.retrieval.digest import sha256_file
from retro_jax.runtime.checkpoint import Checkpointer
from retro_jax.runtime.mesh import check_batch, global_batch, local_batch_slice, mesh_from_config
from retro_jax.runtime.state import sharded_init, with_shardings
from retro_jax.runtime import distributed
from retro_jax.train import retrofit
from retro_jax.train.loader import TrainLoader
from retro_jax.train.metrics import MetricsWriter, peak_flops_per_device
from retro_jax.train.step import decay_horizon, make_sharded_train_step, optimizer_from_config

log = logging.getLogger(__name__)

# Settings that may change between a run and its resume; everything else must match.
RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps",
                     "eval_every", "eval_batches", "microbatches"}
# (params, mesh) -> validation metrics, e.g. {"val_bpb": ..., "val_loss": ...}
Validate = Callable[[Any, jax.sharding.Mesh], dict[str, float]]


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (divergence, mismatched resume)."""


def _ignored_model_keys(saved: dict[str, Any], now: dict[str, Any]) -> set[str]:
    """Model settings that cannot change a resumed run: the initialisation (params are restored),
    the attention's computation (every model.attention mode computes the same function), and the
    scan layout of a model that is scanned in neither run (a workdir from before it existed)."""
    ignored = {"cca_zero_init", "attention", "attention_block"}
    if not saved.get("scan_layers") and not now.get("scan_layers"):
        ignored |= {"scan_start", "scan_period"}
    return ignored


def _check_resume(saved: dict[str, Any], config: ml_collections.ConfigDict) -> None:
    now = config.to_dict()
    diffs = []
    ignored = _ignored_model_keys(saved.get("model", {}), now.get("model", {}))
    for section in ("model", "train"):  # a different mesh is fine: restore reshards
        for k in set(saved.get(section, {})) | set(now.get(section, {})):
            if (section == "train" and k in RESUMABLE_CHANGES) or (section == "model" and k in ignored):
                continue
            a, b = saved.get(section, {}).get(k), now.get(section, {}).get(k)
            if a != b:
                diffs.append(f"{section}.{k}: the workdir's run has {a!r}, this run asks for {b!r}")
    if diffs:
        raise TrainingError("the workdir holds a run with other settings (" + "; ".join(sorted(diffs))
                            + "); use another --workdir or the same settings")


def _check_database(saved: dict[str, Any], db: Database, manifest_sha256: str, allow_db_change: bool) -> None:
    """The resumed run's database and tokenizer must be the ones it recorded (one line otherwise)."""
    data = saved.get("data", {})
    was, tok = data.get("db", ""), data.get("tokenizer_sha256", "")
    if tok and tok != db.tokenizer_sha256:
        raise TrainingError(
            f"tokenizer mismatch: the workdir's run was trained with tokenizer sha256 {tok[:16]} (database "
            f"{was!r}), but --db {str(db.root)!r} was built with tokenizer sha256 {db.tokenizer_sha256[:16]}; "
            "a run cannot change tokenizer: resume on a database built with the run's tokenizer, or use another "
            "--workdir")
    man = data.get("manifest_sha256", "")
    if man and man != manifest_sha256 and not allow_db_change:
        raise TrainingError(
            f"database mismatch: the workdir's run trained on database {was!r} (manifest sha256 {man[:16]}), "
            f"but --db {str(db.root)!r} is another database (manifest sha256 {manifest_sha256[:16]}); pass "
            "--allow-db-change to continue on it deliberately, or use another --workdir")


def _fix_horizon(config: ml_collections.ConfigDict, saved: dict[str, Any] | None) -> ml_collections.ConfigDict:
    """`config` with train.decay_steps fixed: the saved run's (a workdir from before decay_steps
    decayed over its own train.steps), else this run's train.decay_steps or train.steps.
    A resume asking for another non-zero decay_steps is refused."""
    config = config.copy_and_resolve_references()
    if saved is None:
        config.train.decay_steps = decay_horizon(config.train)
        return config
    st = saved.get("train", {})
    fixed = int(st.get("decay_steps") or st["steps"])
    asked = int(config.train.decay_steps)
    if asked and asked != fixed:
        raise TrainingError(
            f"train.decay_steps: the workdir's run decays its learning rate over {fixed} steps, this run asks "
            f"for {asked}; drop --config.train.decay_steps (a larger --steps continues at the final rate) "
            "or use another --workdir")
    config.train.decay_steps = fixed
    saved["train"] = dict(st, decay_steps=fixed)
    return config


def _copy_tokenizer(db: Database, workdir: Path) -> None:
    """WORKDIR/tokenizer.model := the database's tokenizer (atomically; its sha256 checked)."""
    dst = workdir / TOKENIZER_FILE
    if dst.is_file() and sha256_file(dst) == db.tokenizer_sha256:
        return
    tmp = dst.with_name(f".{TOKENIZER_FILE}.tmp")
    shutil.copyfile(db.root / TOKENIZER_FILE, tmp)
    got = sha256_file(tmp)
    if got != db.tokenizer_sha256:
        tmp.unlink()
        raise TrainingError(f"the tokenizer of database {str(db.root)!r} has sha256 {got[:16]}, its manifest "
                            f"records {db.tokenizer_sha256[:16]}: the database is damaged (run db-check)")
    os.replace(tmp, dst)


def train(config: ml_collections.ConfigDict, db_dir: str, workdir: str, *, init_from: str | None = None,
          freeze_decoder: bool = False, progress: bool = True, coordinator: str | None = None,
          num_processes: int | None = None, process_id: int | None = None,
          validate: Validate | None = None, allow_db_change: bool = False) -> dict[str, Any]:
    """Train (or resume) the run in `workdir`; returns the last logged metrics.

    allow_db_change: let a resume continue on another database than the run's (same tokenizer).

    validate: called every `train.eval_every` steps with the params and the mesh (required when
    eval_every > 0); its metrics join that step's line."""
    # -- processes, config, database: every check before anything compiles ----------------
    distributed.maybe_initialize(coordinator, num_processes, process_id)
    cfg = model_config(config)
    attention_mode.check(cfg.attention, cfg.attention_block)  # one line, before anything compiles
    tc = config.train
    if tc.eval_every and validate is None:
        raise ValueError("train.eval_every > 0 needs a validate function (retro_jax.eval.run.make_validator; "
                         "the retro-jax train verb passes one)")
    workdir_p = Path(workdir)
    workdir_p.mkdir(parents=True, exist_ok=True)
    db = Database.open(db_dir)
    db.check_model(cfg)
    retrieval = bool(tc.retrieval and cfg.is_retro)
    if freeze_decoder and not init_from:
        raise ValueError("--freeze-decoder needs --init-from BASELINE_WORKDIR (the decoder to freeze)")
    mesh = mesh_from_config(config.mesh)
    check_batch(tc.batch_size // tc.microbatches, mesh)  # every microbatch splits over data x fsdp
    loader = TrainLoader(db, "train", tc.seq_len, tc.batch_size, cfg.num_neighbours, tc.seed,
                         jax.process_index(), jax.process_count(), retrieval=retrieval,
                         rows=local_batch_slice(tc.batch_size, mesh))

    # -- resume checks (before anything compiles), then optimizer and state ------------------
    manifest_sha256 = sha256_file(db.root / MANIFEST)
    ckpt = Checkpointer(workdir_p, max_to_keep=tc.keep_checkpoints, save_interval_steps=tc.checkpoint_every)
    latest = ckpt.latest_step()
    run = read_workdir_config(workdir_p).to_dict() if latest is not None else None
    try:
        config = _fix_horizon(config, run)
        if run is not None:
            _check_resume(run, config)
            _check_database(run, db, manifest_sha256, allow_db_change)
    except TrainingError:
        ckpt.close()
        raise
    tc = config.train
    # The database is recorded so that a resume and evaluation refuse another one.
    config.data.update(db=str(db_dir), tokenizer_sha256=db.tokenizer_sha256, manifest_sha256=manifest_sha256)
    if jax.process_index() == 0:
        _copy_tokenizer(db, workdir_p)
    mask = retrofit.trainable_mask(abstract_params(cfg)) if freeze_decoder else None
    optimizer, schedule = optimizer_from_config(tc, trainable_mask=mask)
    state, shardings = sharded_init(cfg, optimizer, mesh, jax.random.key(tc.seed))
    if latest is not None:
        latest, state, data_state, _ = ckpt.restore_newest_readable(with_shardings(state, shardings))
        loader.restore(data_state)
        log.info("resumed from step %d in %s", latest, workdir_p)
        print(f"resuming from checkpoint {latest} in {workdir_p}", flush=True)
    elif init_from:
        state = retrofit.init_from_baseline(state, shardings.params, cfg, init_from, mesh)
        print(f"decoder initialised from {init_from}" + (" and frozen" if freeze_decoder else ""), flush=True)
    if jax.process_index() == 0:
        write_workdir_config(workdir_p, config)

    step_fn = make_sharded_train_step(cfg, optimizer, mesh, shardings, schedule, tc.microbatches, trainable_mask=mask)

    # -- the loop ----------------------------------------------------------------------------
    start = int(jax.device_get(state.step))
    lead = jax.process_index() == 0
    writer = MetricsWriter(workdir_p, start, tc.steps, enabled=lead, progress=progress)
    stop = {"signal": None}
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
        handlers = {s: signal.signal(s, lambda sig, _f: stop.update(signal=sig))
                    for s in (signal.SIGTERM, signal.SIGINT)}
    model_flops = flops_per_token(cfg, tc.seq_len, training=True) * tc.batch_size * tc.seq_len
    peak = peak_flops_per_device() * jax.device_count()
    last: dict[str, Any] = {}
    window: list[dict[str, jax.Array]] = []
    t_window = time.perf_counter()
    saved = latest
    # Non-finite steps in a row, counted on the host from each log window's `skipped` metrics:
    # the device is read only at log steps (no per-step sync; the next batch is put on the
    # devices while a step runs), so the halt comes within one log window of the max_bad_steps-th
    # bad step. A skipped step leaves params and optimizer state as they were, so whatever a
    # checkpoint in between holds is the last good state.
    bad_run = int(jax.device_get(state.bad_in_a_row))
    try:
        step = start
        while step < tc.steps and stop["signal"] is None:
            batch = global_batch(next(loader), mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            window.append(metrics)
            writer.advance()
            if step % tc.log_every == 0 or step == tc.steps:
                host = jax.device_get(window)
                dt = time.perf_counter() - t_window
                last = {k: float(np.mean([m[k] for m in host])) for k in ("loss", "bits_per_token", "grad_norm")}
                last.update(lr=float(host[-1].get("learning_rate", np.nan)),
                            skipped_steps=int(jax.device_get(state.skipped)),
                            tokens_per_s=len(host) * tc.batch_size * tc.seq_len / dt,
                            mfu=len(host) * model_flops / dt / peak)
                if retrieval:  # the window rule so far (this process's rows, kept across resumes)
                    last.update(window_slots=loader.window_stats["slots"],
                                window_dropped=loader.window_stats["dropped"])
                if validate is not None and step % tc.eval_every == 0:
                    last.update(validate(state.params, mesh))
                writer.write(step, last)
                window_start = step - len(host)
                for i, m in enumerate(host):
                    bad_run = bad_run + 1 if int(m["skipped"]) else 0
                    if tc.max_bad_steps and bad_run >= tc.max_bad_steps:
                        raise TrainingError(
                            f"{bad_run} steps in a row had a non-finite loss or gradient (step {window_start + i + 1}); "
                            f"stopping. The last checkpoint ({ckpt.latest_step()}) holds the last good state; "
                            "lower --config.train.lr_max or check the data.")
                window, t_window = [], time.perf_counter()
            if ckpt.save(step, state, loader.state(), config.to_dict()):
                saved = step
        if saved != step:  # the final (or interrupted) step is always kept
            ckpt.save(step, state, loader.state(), config.to_dict(), force=True)
        if stop["signal"] is not None:
            print(f"stopped by signal {stop['signal']} at step {step}; checkpoint written, rerun to resume",
                  flush=True)
    finally:
        ckpt.close()  # waits for async saves
        writer.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    return dict(last, step=step, workdir=str(workdir_p))
