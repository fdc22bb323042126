"""Preset sizes against the paper's Table 2, counted by abstract evaluation (nothing allocated)."""

import pytest

from retro_jax.config import PAPER_PARAMS_M, ModelConfig, apply_overrides, load_config, model_config, presets

PRESETS = presets()
from retro_jax.model.count import flops_per_token, param_counts


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_preset_non_embedding_params_match_table_2(name):
    counts = param_counts(ModelConfig.from_preset(name))
    want = PAPER_PARAMS_M[name] * 1e6
    assert abs(counts.non_embedding / want - 1) < 0.015, (name, counts.non_embedding, want)
    assert counts.total == counts.embedding + counts.non_embedding


@pytest.mark.parametrize("retro,baseline", [("retro-172m", "baseline-132m"), ("retro-7.5b", "baseline-7b"),
                                            ("tiny", "tiny-baseline")])
def test_retrieval_params_are_exactly_what_the_baseline_lacks(retro, baseline):
    r, b = param_counts(ModelConfig.from_preset(retro)), param_counts(ModelConfig.from_preset(baseline))
    assert b.retrieval == 0 and r.retrieval > 0
    assert r.non_embedding - r.retrieval == b.non_embedding


def test_paper_cca_layer_counts():
    assert [len(PRESETS[n].cca_layers) for n in ("retro-172m", "retro-425m", "retro-1.5b", "retro-7.5b")] \
        == [3, 3, 7, 9]


def test_flops_grow_with_retrieval_and_size():
    assert flops_per_token(PRESETS["retro-172m"]) > flops_per_token(PRESETS["baseline-132m"])
    # Dense part dominates for the big model: close to 6 x non-embedding params + logits.
    cfg = PRESETS["baseline-7b"]
    dense = 6 * param_counts(cfg).non_embedding + 6 * cfg.d_model * cfg.vocab_size
    assert 1.0 < flops_per_token(cfg) / dense < 1.3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_a_config_file(name):
    assert model_config(name.replace("-", "_").replace(".", "_")) == ModelConfig.from_preset(name)


def test_unknown_keys_and_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(ValueError, match="neither a preset"):
        load_config("no-such-model")
    with pytest.raises(ValueError, match="cca_layers"):
        ModelConfig(num_layers=4, cca_layers=(6,))


def test_overrides_keep_types_and_reject_unknown_keys():
    from retro_jax.config import apply_overrides

    cfg = apply_overrides(load_config("tiny"), ["--config.train.steps=7", "config.train.lr_max=1",
                                                "--config.model.cca_layers=(4,)", "mesh.data=2"])
    assert cfg.train.steps == 7 and cfg.train.lr_max == 1.0 and isinstance(cfg.train.lr_max, float)
    assert ModelConfig.from_dict(dict(cfg.model)).cca_layers == (4,) and cfg.mesh.data == 2
    assert load_config("tiny").train.steps != 7  # the preset itself is untouched
    for bad, msg in [("--config.train.stepz=1", "unknown config key"),
                     ("--config.train.steps=abc", "expects int"),
                     ("--config.model.d_model=0", "must be positive"),
                     ("--config.train.steps", "form --config.key=value")]:
        with pytest.raises(ValueError, match=msg):
            apply_overrides(load_config("tiny"), [bad])


def test_resume_ignores_settings_that_cannot_change_a_restored_run():
    from retro_jax.train.loop import TrainingError, _check_resume

    now = load_config("tiny")
    old = now.to_dict()
    old["model"] = {k: v for k, v in old["model"].items() if k != "cca_zero_init"}  # before it existed
    old["model"].update(scan_start=6, scan_period=3)  # an unscanned run: the layout never applied
    _check_resume(old, now)
    scanned = apply_overrides(load_config("tiny"), ["model.scan_layers=True"])
    with pytest.raises(TrainingError, match="model.scan_start"):
        _check_resume(dict(old, model=dict(old["model"], scan_layers=True)), scanned)
    with pytest.raises(TrainingError, match="model.d_model"):
        _check_resume(dict(old, model=dict(old["model"], d_model=64)), now)
