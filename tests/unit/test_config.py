"""Config tree: YAML loading, dotted overrides, validation errors, resolved-config round trip, recipe."""

import os
import re
from pathlib import Path

import pytest

from rgkd_megatron.config import (
    ModelConfig,
    ParallelConfig,
    RGKDConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    data_parallel_size,
    load_config,
    loader,
    save_resolved_config,
    validate_config,
)

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "examples" / "tiny_sft.yaml"


def _cfg(*overrides: str) -> RGKDConfig:
    return load_config(None, overrides, validate=False)


def _field_error(field: str, detail: str = "") -> str:
    """Regex: a message line that starts with ``field:`` and contains ``detail``."""
    return rf"(?m)^\s*{re.escape(field)}: .*{re.escape(detail)}"


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Overrides


@pytest.mark.parametrize(
    "override, section, name, expected",
    [
        ("model.num_layers=4", "model", "num_layers", 4),
        ("train.lr=1e-4", "train", "lr", 1e-4),
        ("train.lr=0.5", "train", "lr", 0.5),
        ("train.lr=2", "train", "lr", 2.0),  # int accepted for a float field
        ("parallel.sequence_parallel=true", "parallel", "sequence_parallel", True),
        ("logging.progress_bar=false", "logging", "progress_bar", False),
        ("model.num_query_groups=2", "model", "num_query_groups", 2),
        ("model.rotary_scaling_factor=8.0", "model", "rotary_scaling_factor", 8.0),
        ("data.valid_path=null", "data", "valid_path", None),
        ("model.spec=te", "model", "spec", "te"),
        ("data.tokenizer=/models/llama/tokenizer.json", "data", "tokenizer", "/models/llama/tokenizer.json"),
        ("data.tokenizer=123", "data", "tokenizer", "123"),  # str field keeps the raw text
        ("data.train_path=", "data", "train_path", ""),
        ("data.train_path=[unclosed", "data", "train_path", "[unclosed"),  # not YAML: raw text
        ("logging.run_dir=runs/a=b", "logging", "run_dir", "runs/a=b"),  # split on the first '='
    ],
)
def test_override_parses_types(override, section, name, expected):
    value = getattr(getattr(_cfg(override), section), name)
    assert value == expected
    assert type(value) is type(expected)


def test_override_null_resets_optional_and_later_override_wins():
    cfg = _cfg("model.num_query_groups=2", "model.num_query_groups=null", "train.seed=1", "train.seed=7")
    assert cfg.model.num_query_groups is None
    assert cfg.train.seed == 7


def test_apply_overrides_does_not_mutate_its_input():
    base = RGKDConfig()
    new = apply_overrides(base, ["model.num_layers=6"])
    assert (base.model.num_layers, new.model.num_layers) == (2, 6)


@pytest.mark.parametrize(
    "override, field, detail",
    [
        ("train.lrr=1e-4", "train.lrr", "did you mean 'train.lr'?"),
        ("modle.num_layers=2", "modle", "did you mean 'model'?"),
        ("model.num_layer=2", "model.num_layer", "did you mean 'model.num_layers'?"),
        ("train.lr.x=1", "train.lr.x", "is a field"),
        ("train=1", "train", "got a section"),
    ],
)
def test_unknown_override_key_errors(override, field, detail):
    with pytest.raises(ValueError, match=_field_error(field, detail)):
        _cfg(override)


def test_override_without_equals_errors():
    with pytest.raises(ValueError, match=re.escape("expected 'section.field=value'")):
        _cfg("train.lr")


def test_overrides_must_not_be_a_single_string():
    with pytest.raises(TypeError, match="sequence"):
        load_config(None, "train.lr=1")


@pytest.mark.parametrize(
    "override, field, detail",
    [
        ("model.num_layers=two", "model.num_layers", "expected an int, got 'two'"),
        ("model.num_layers=2.5", "model.num_layers", "expected an int, got 2.5"),
        ("train.seed=true", "train.seed", "expected an int, got True"),  # bool is not an int
        ("train.lr=fast", "train.lr", "expected a number, got 'fast'"),
        ("train.lr=null", "train.lr", "expected a number, got None"),
        ("parallel.sequence_parallel=1", "parallel.sequence_parallel", "expected a bool"),
        ("model.num_query_groups=abc", "model.num_query_groups", "expected an int or null"),
        ("model.num_layers=[1, 2]", "model.num_layers", "expected an int"),
    ],
)
def test_override_wrong_type_errors(override, field, detail):
    with pytest.raises(ValueError, match=_field_error(field, detail)):
        _cfg(override)


# ---------------------------------------------------------------------------------------------
# YAML loading


def test_yaml_values_and_defaults(tmp_path):
    path = _write(tmp_path, "model:\n  num_layers: 4\ntrain:\n  lr: 1e-4\n  min_lr: 0\nparallel:\n")
    cfg = load_config(path)
    assert cfg.model.num_layers == 4
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)  # 1e-4 without a dot is a float
    assert cfg.train.min_lr == 0.0 and isinstance(cfg.train.min_lr, float)
    assert cfg.model.hidden_size == ModelConfig().hidden_size
    assert cfg.parallel == ParallelConfig()  # an empty section means defaults


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing\n")) == RGKDConfig()


def test_overrides_apply_after_yaml(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.01\n  min_lr: 0.001\n")
    assert load_config(path, ["train.lr=0.02"]).train.lr == 0.02


@pytest.mark.parametrize(
    "text, field, detail",
    [
        ("model:\n  num_layer: 2\n", "model.num_layer", "did you mean 'model.num_layers'?"),
        ("modle:\n  num_layers: 2\n", "modle", "did you mean 'model'?"),
        ("train:\n  micro_batch_size: two\n", "train.micro_batch_size", "expected an int, got 'two'"),
        ("data:\n  tokenizer: 5\n", "data.tokenizer", "expected a string, got 5"),
        ("model:\n  spec: fast\n", "model.spec", "expected one of 'auto', 'local', 'te'"),
        ("model: [1, 2]\n", "model", "expected a mapping"),
    ],
)
def test_yaml_errors_name_the_field(tmp_path, text, field, detail):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {field}: ") + ".*" + re.escape(detail)):
        load_config(path)


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="config: expected a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_yaml_syntax_error_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: {num_layers: 2\n"))


def test_yaml_never_constructs_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = _write(tmp_path, f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Validation


def test_defaults_are_valid():
    validate_config(RGKDConfig())
    validate_config(RGKDConfig(), world_size=1)
    validate_config(RGKDConfig(), world_size=2)


@pytest.mark.parametrize(
    "override, field, detail",
    [
        ("model.spec=fast", "model.spec", "expected one of 'auto', 'local', 'te', got 'fast'"),
        ("model.params_dtype=fp8", "model.params_dtype", "expected one of 'auto', 'fp32', 'bf16', 'fp16'"),
        ("model.recompute=some", "model.recompute", "expected one of 'none', 'selective', 'full'"),
        ("parallel.backend=mpi", "parallel.backend", "expected one of 'auto', 'nccl', 'gloo'"),
        ("optimizer.name=lion", "optimizer.name", "expected one of 'adam', 'sgd'"),
        ("train.lr_decay_style=step", "train.lr_decay_style", "expected one of 'cosine', 'linear'"),
        ("logging.wandb_mode=cloud", "logging.wandb_mode", "expected one of 'online', 'offline'"),
        ("logging.log_level=LOUD", "logging.log_level", "expected one of 'DEBUG', 'INFO'"),
    ],
)
def test_bad_choice_errors(override, field, detail):
    with pytest.raises(ValueError, match=_field_error(field, detail)):
        _cfg(override)


@pytest.mark.parametrize(
    "override",
    [
        "model.num_layers=0",
        "model.hidden_size=-64",
        "model.ffn_hidden_size=0",
        "model.num_attention_heads=0",
        "model.num_query_groups=0",
        "model.vocab_size=0",
        "model.max_position_embeddings=0",
        "model.norm_epsilon=0",
        "parallel.tensor_model_parallel_size=0",
        "parallel.pipeline_model_parallel_size=-1",
        "data.seq_length=0",
        "train.train_iters=0",
        "train.micro_batch_size=0",
        "train.global_batch_size=0",
        "train.lr=0",
        "optimizer.adam_eps=0",
    ],
)
def test_non_positive_values_error(override):
    field, value = override.split("=")
    cfg = _cfg(override)
    with pytest.raises(ValueError, match=_field_error(field, f"expected a value > 0, got {value}")):
        validate_config(cfg)


@pytest.mark.parametrize(
    "overrides, field, detail",
    [
        (["train.min_lr=-1e-5"], "train.min_lr", "expected a value >= 0"),
        (["train.lr_warmup_iters=-1"], "train.lr_warmup_iters", "expected a value >= 0"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay", "expected a value >= 0"),
        (["optimizer.adam_beta2=1.0"], "optimizer.adam_beta2", "expected a value < 1"),
    ],
)
def test_out_of_range_values_error(overrides, field, detail):
    with pytest.raises(ValueError, match=_field_error(field, detail)):
        validate_config(_cfg(*overrides))


# (overrides, world_size, field, detail): each breaks exactly one rule of an otherwise valid config.
SHAPE_CASES = [
    pytest.param(
        ["model.num_attention_heads=2", "parallel.tensor_model_parallel_size=4"], None,
        "model.num_attention_heads", "expected a multiple of parallel.tensor_model_parallel_size (4), got 2",
        id="heads_vs_tp",
    ),
    pytest.param(
        ["model.num_query_groups=1", "parallel.tensor_model_parallel_size=2"], None,
        "model.num_query_groups", "expected a multiple of parallel.tensor_model_parallel_size (2), got 1",
        id="query_groups_vs_tp",
    ),
    pytest.param(
        ["model.num_query_groups=3"], None,
        "model.num_attention_heads", "expected a multiple of model.num_query_groups (3), got 4",
        id="heads_vs_query_groups",
    ),
    pytest.param(
        ["model.hidden_size=66"], None,
        "model.hidden_size", "expected a multiple of model.num_attention_heads (4), got 66",
        id="hidden_vs_heads",
    ),
    pytest.param(
        ["model.ffn_hidden_size=170", "parallel.tensor_model_parallel_size=4"], None,
        "model.ffn_hidden_size", "expected a multiple of parallel.tensor_model_parallel_size (4), got 170",
        id="ffn_vs_tp",
    ),
    pytest.param(
        ["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"], None,
        "model.num_layers", "expected a multiple of parallel.pipeline_model_parallel_size (2), got 3",
        id="layers_vs_pp",
    ),
    pytest.param(
        ["parallel.tensor_model_parallel_size=2"], 3,
        "world_size", "(2 * 1 = 2), got 3",
        id="world_vs_tp_pp",
    ),
    pytest.param(
        ["parallel.pipeline_model_parallel_size=2"], 6,
        "train.global_batch_size", "(2 * 3 = 6), got 4",
        id="gbs_vs_mbs_dp",
    ),
    pytest.param(
        ["train.global_batch_size=5"], None,
        "train.global_batch_size", "(2 * 1 = 2), got 5",
        id="gbs_vs_mbs",
    ),
    pytest.param(
        ["parallel.sequence_parallel=true"], None,
        "parallel.sequence_parallel", "expected false when parallel.tensor_model_parallel_size is 1",
        id="sp_without_tp",
    ),
    pytest.param(
        ["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=4", "data.seq_length=126"],
        None, "data.seq_length", "expected a multiple of parallel.tensor_model_parallel_size (4), got 126",
        id="sp_seq_vs_tp",
    ),
    pytest.param(
        ["data.seq_length=512"], None,
        "data.seq_length", "expected <= model.max_position_embeddings (256), got 512",
        id="seq_vs_max_positions",
    ),
    pytest.param(
        ["train.min_lr=0.01"], None,
        "train.min_lr", "expected <= train.lr (0.001), got 0.01",
        id="min_lr_vs_lr",
    ),
    pytest.param(
        ["parallel.overlap_param_gather=true"], None,
        "parallel.overlap_param_gather", "expected false unless parallel.use_distributed_optimizer",
        id="overlap_param_gather_without_dist_opt",
    ),
]  # fmt: skip


@pytest.mark.parametrize("overrides, world_size, field, detail", SHAPE_CASES)
def test_shape_constraint_errors(overrides, world_size, field, detail):
    cfg = _cfg(*overrides)
    with pytest.raises(ValueError, match=_field_error(field, detail)):
        validate_config(cfg, world_size)
    if world_size is None:  # load_config validates what needs no world size
        with pytest.raises(ValueError, match=_field_error(field, detail)):
            load_config(None, overrides)


def test_fixed_shape_is_accepted():
    """The fix of each case above validates, so the errors really come from the broken rule."""
    validate_config(_cfg("model.num_attention_heads=4", "parallel.tensor_model_parallel_size=4"))
    validate_config(_cfg("model.num_query_groups=2", "parallel.tensor_model_parallel_size=2"), 2)
    validate_config(_cfg("parallel.pipeline_model_parallel_size=2", "train.global_batch_size=6"), 6)
    validate_config(_cfg("parallel.overlap_param_gather=true", "parallel.use_distributed_optimizer=true"))
    validate_config(_cfg("parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2"), 2)


def test_all_problems_reported_together():
    cfg = _cfg("model.hidden_size=66", "train.min_lr=0.01", "data.seq_length=512")
    with pytest.raises(ValueError, match="3 config errors") as info:
        validate_config(cfg)
    for field in ("model.hidden_size", "train.min_lr", "data.seq_length"):
        assert re.search(_field_error(field), str(info.value)), field


def test_type_errors_in_code_built_config():
    cfg = RGKDConfig()
    cfg.model.hidden_size = "64"
    cfg.parallel.sequence_parallel = 1
    cfg.train.lr = 1  # ints are fine for float fields
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert re.search(_field_error("model.hidden_size", "expected an int, got '64'"), message)
    assert re.search(_field_error("parallel.sequence_parallel", "expected a bool"), message)
    assert "train.lr" not in message


@pytest.mark.parametrize("world_size", [0, -2, 1.5, True])
def test_bad_world_size_errors(world_size):
    with pytest.raises(ValueError, match=_field_error("world_size", "expected a positive int")):
        data_parallel_size(RGKDConfig(), world_size)


@pytest.mark.parametrize("tp, pp, world_size, dp", [(1, 1, 1, 1), (1, 1, 4, 4), (2, 1, 4, 2), (2, 2, 8, 2)])
def test_data_parallel_size(tp, pp, world_size, dp):
    cfg = _cfg(f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}")
    assert data_parallel_size(cfg, world_size) == dp


# ---------------------------------------------------------------------------------------------
# Resolved config


def _custom_cfg() -> RGKDConfig:
    return _cfg(
        "model.num_query_groups=2",
        "model.rotary_scaling_factor=8",
        "model.load=/ckpt/iter_0000100",
        "optimizer.adam_eps=1e-8",
        "train.lr=3e-4",
        "train.min_lr=3e-5",
        "parallel.sequence_parallel=true",
        "parallel.tensor_model_parallel_size=2",
        "data.valid_path=null",
        "logging.wandb=true",
    )


def test_dict_round_trip():
    cfg = _custom_cfg()
    data = config_to_dict(cfg)
    assert data["model"]["num_query_groups"] == 2 and data["data"]["valid_path"] is None
    assert config_from_dict(data) == cfg


def test_save_resolved_config_round_trip(tmp_path):
    cfg = _custom_cfg()
    run_dir = tmp_path / "runs" / "x"
    path = save_resolved_config(cfg, str(run_dir))
    assert path == str(run_dir / "config.yaml")
    assert load_config(path) == cfg
    assert os.listdir(run_dir) == ["config.yaml"]  # no temp file left behind

    cfg2 = apply_overrides(cfg, ["train.seed=99"])
    save_resolved_config(cfg2, str(run_dir))  # overwrites
    assert load_config(path).train.seed == 99


def test_save_resolved_config_is_atomic(tmp_path, monkeypatch):
    save_resolved_config(RGKDConfig(), str(tmp_path))
    before = (tmp_path / "config.yaml").read_text()

    def fail_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(loader.os, "replace", fail_replace)
    with pytest.raises(OSError, match="disk full"):
        save_resolved_config(_custom_cfg(), str(tmp_path))
    assert (tmp_path / "config.yaml").read_text() == before
    assert os.listdir(tmp_path) == ["config.yaml"]


# ---------------------------------------------------------------------------------------------
# The tiny recipe


def test_recipe_uses_defaults_and_points_at_tiny_data():
    cfg = load_config(str(RECIPE))
    assert cfg.data.train_path == "examples/data/tiny_sft.jsonl"
    assert cfg.data.tokenizer == "examples/tokenizer/tokenizer.json"
    assert cfg.logging.run_dir == "runs/tiny_sft"
    assert cfg.parallel == ParallelConfig()
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.train_iters) == (4, 128, 300)
    assert cfg.model.spec == ModelConfig().spec and cfg.train.seed == TrainConfig().seed


@pytest.mark.parametrize(
    "world_size, overrides",
    [
        (1, []),
        (2, []),
        (2, ["parallel.tensor_model_parallel_size=2"]),
        (2, ["parallel.pipeline_model_parallel_size=2"]),
        (4, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
        (4, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]),
        (4, ["parallel.tensor_model_parallel_size=4"]),
        (4, ["train.global_batch_size=16"]),
    ],
)
def test_recipe_validates(world_size, overrides):
    validate_config(load_config(str(RECIPE), overrides), world_size)


def test_recipe_pure_data_parallel_on_4_ranks_needs_a_bigger_batch():
    cfg = load_config(str(RECIPE))
    with pytest.raises(ValueError, match=_field_error("train.global_batch_size", "(4 * 4 = 16), got 8")):
        validate_config(cfg, world_size=4)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["pbkd.k_r=0", "pbkd.k_p=0"], "pbkd.k_r"),
        (["pbkd.samples_per_prompt=1"], "pbkd.samples_per_prompt"),
        (["pbkd.heldout_fraction=1.5"], "pbkd.heldout_fraction"),
        (["pbkd.reward_bound=0"], "pbkd.reward_bound"),
        (["pbkd.ppo_clip=-0.2"], "pbkd.ppo_clip"),
        (["pbkd.kd_beta=1.0"], "pbkd.kd_beta"),
        (["pbkd.judge=label_file"], "pbkd.judge_label_file"),
        (["pbkd.method=distill"], "pbkd.method"),
    ],
)
def test_pbkd_section_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        validate_config(load_config(str(RECIPE), overrides, validate=False), world_size=1)
