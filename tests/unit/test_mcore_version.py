"""The megatron-core version range and the per-version check of what the CPU layer patches."""

import warnings

import pytest

from rgkd_megatron.parallel import cpu_compat, mcore_version


def test_both_ends_of_the_tested_range_pass():
    assert mcore_version.check_version(mcore_version.TESTED_MIN, strict=True)
    assert mcore_version.check_version(mcore_version.TESTED_MAX, strict=True)
    assert mcore_version.check_version(mcore_version.installed_version(), strict=True)


def test_a_local_build_label_is_judged_by_its_release():
    assert mcore_version.check_version("0.19.2+2377bcb", strict=True, allow_untested=False)
    with pytest.raises(RuntimeError, match="0.19.3"):
        mcore_version.check_version("0.19.3+2377bcb", strict=True, allow_untested=False)


@pytest.mark.parametrize("version", ["0.15.0", "0.20.0", "1.0.0rc1"])
def test_untested_version_refused_on_cpu_naming_the_range(version):
    with pytest.raises(RuntimeError) as err:
        mcore_version.check_version(version, strict=True, allow_untested=False)
    message = str(err.value)
    assert version in message and mcore_version.TESTED_MIN in message and mcore_version.TESTED_MAX in message
    assert mcore_version.ALLOW_ENV in message


def test_untested_version_only_warns_when_allowed_or_on_gpu():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not mcore_version.check_version("0.20.1", strict=True, allow_untested=True)
        assert not mcore_version.check_version("0.20.2", strict=False, allow_untested=False)
    assert [str(w.message).split(" is ")[0] for w in caught] == [
        "megatron-core 0.20.1",
        "megatron-core 0.20.2",
    ]


def test_every_patch_target_exists_in_the_installed_release():
    assert set(mcore_version.PATCH_TARGETS) == set(cpu_compat.ALL_PATCHES)
    assert mcore_version.missing_patch_targets(cpu_compat.ALL_PATCHES) == []


def test_a_missing_internal_is_named(monkeypatch):
    from megatron.core.transformer import transformer_block

    monkeypatch.delattr(transformer_block, "LayerNormImpl")
    with pytest.raises(RuntimeError) as err:
        mcore_version.check_cpu_patches(("rng", "sp_norm"), version=mcore_version.TESTED_MIN)
    assert "sp_norm: megatron.core.transformer.transformer_block:LayerNormImpl" in str(err.value)
    assert "rng:" not in str(err.value)


def test_a_missing_method_is_named(monkeypatch):
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.delattr(distrib_optimizer.DistributedOptimizer, "_set_main_param_and_optimizer_states")
    missing = mcore_version.missing_patch_targets(("distopt_torch_adam",))
    assert missing == [
        "distopt_torch_adam: megatron.core.optimizer.distrib_optimizer:"
        "DistributedOptimizer._set_main_param_and_optimizer_states"
    ]


def test_setup_declares_the_tested_range():
    from pathlib import Path

    setup_py = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert f'"megatron-core>={mcore_version.TESTED_MIN},<={mcore_version.TESTED_MAX}"' in setup_py
