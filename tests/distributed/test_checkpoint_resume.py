"""A checkpoint saved at TP=2 x PP=2 reloads at TP=1 x PP=1 (and the reverse), and training then
continues with the same losses as an uninterrupted TP=1 run. Runs the real loop (``run_training``)
on the shipped tiny data, with model + optimizer (distributed optimizer on the sharded side) + LR
schedule + data cursor restored from megatron-core dist_checkpointing. Both optimizer kinds reshard:
A -> D uses the distributed optimizer (fully_reshardable), B -> C the plain one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distributed_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
STEPS, SAVE_AT = 4, 2


def _cfg(run_dir: str, tp: int, pp: int, init: str | None, train_iters: int, distopt: bool):
    from rgkd_megatron.config import load_config

    return load_config(
        str(REPO / "examples" / "tiny_sft.yaml"),
        [
            f"logging.run_dir={run_dir}",
            "logging.progress_bar=false",
            f"data.train_path={REPO}/examples/data/tiny_sft.jsonl",
            f"data.tokenizer={REPO}/examples/tokenizer/tokenizer.json",
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.ffn_hidden_size=96",
            "model.num_query_groups=2",
            "data.seq_length=48",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            "train.lr_warmup_iters=1",
            f"train.train_iters={train_iters}",
            f"train.save_interval={SAVE_AT}",
            "train.log_interval=1",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            f"parallel.use_distributed_optimizer={str(distopt).lower()}",
            f"model.load={init}" if init else "model.load=null",
        ],
    )


def _losses(run_dir: str) -> dict[int, float]:
    return {row["step"]: row["lm_loss"] for row in map(json.loads, open(f"{run_dir}/metrics.jsonl"))}


def _single(rank, world_size, work):
    """Save a shared init; the uninterrupted TP=1 reference; then TP=1 resuming run C."""
    from megatron.core import parallel_state

    from rgkd_megatron.checkpoint.dist_ckpt import save_model_weights
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.loop import run_training
    from rgkd_megatron.training.setup import init_role, teardown_roles

    if not Path(f"{work}/init").exists():
        cfg = _cfg(f"{work}/A", 1, 1, None, STEPS, True)
        groups = init_role(layout_for_world(1, 1, 1), seed=3)
        save_model_weights(f"{work}/init", build_policy(cfg.model, cfg.parallel, groups, 512))
        teardown_roles()
        run_training(_cfg(f"{work}/A", 1, 1, f"{work}/init", STEPS, True))
    else:
        run_training(_cfg(f"{work}/C", 1, 1, f"{work}/init", STEPS, False))
    parallel_state.destroy_model_parallel()


def _sharded(rank, world_size, work):
    """B: TP2xPP2 trains (saving at SAVE_AT). D: TP2xPP2 resumes the TP=1 checkpoint."""
    from rgkd_megatron.training.loop import run_training
    from rgkd_megatron.training.setup import teardown_roles

    run_training(_cfg(f"{work}/B", 2, 2, f"{work}/init", STEPS, False))
    teardown_roles()
    run_training(_cfg(f"{work}/D", 2, 2, f"{work}/init", STEPS, True))
    teardown_roles()


def _copy_checkpoint(src_run: Path, dst_run: Path, iteration: int) -> None:
    name = f"iter_{iteration:07d}"
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / name, dst_run / "checkpoints" / name)
    (dst_run / "checkpoints" / "latest").write_text(name)


def test_checkpoint_reshards_and_training_continues(tmp_path):
    work = tmp_path
    run_distributed(_single, 1, args=(str(work),))  # init + reference A (TP1, saves at step 2 and 4)
    _copy_checkpoint(work / "A", work / "D", SAVE_AT)  # D starts from A's TP=1 step-2 checkpoint
    run_distributed(_sharded, 4, args=(str(work),), timeout=400)
    _copy_checkpoint(work / "B", work / "C", SAVE_AT)  # C starts from B's TP2xPP2 step-2 checkpoint
    run_distributed(_single, 1, args=(str(work),))

    reference = _losses(str(work / "A"))
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS] < reference[1], "the reference run did not learn"
    sharded = _losses(str(work / "B"))
    for step in range(1, STEPS + 1):  # same weights, same data: TP2xPP2 == TP1
        assert abs(sharded[step] - reference[step]) < 1e-5, (step, sharded[step], reference[step])
    for name in ("C", "D"):  # resumed runs log only the steps after the checkpoint
        resumed = _losses(str(work / name))
        assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1)), (name, sorted(resumed))
        for step, loss in resumed.items():
            assert abs(loss - reference[step]) < 1e-5, (name, step, loss, reference[step])
