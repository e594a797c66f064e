"""Build a teacher top-k cache: the teacher (megatron-core, any TP/PP) over a tokenized dataset.

Collective over the world (every rank calls ``build_teacher_cache`` with its role groups)::

    groups = init_role(layout_for_world(tp, pp, world_size), seed)
    teacher = build_teacher(model_cfg, parallel_cfg, groups, model_vocab); load_model_weights(ckpt, teacher)
    manifest = build_teacher_cache(teacher, groups, dataset, "cache_dir", BuildOptions(k=64), identity)

Work split. Rank 0 plans the shards (``manifest.plan_shards``; only missing ones on a resume) and
broadcasts the pending list; DP rank d takes pending shards d, d + dp, ... . Inside a DP group the
TP x PP ranks run the same shards in lockstep; the last pipeline stage's TP rank 0 writes them.

Micro-batches are canonical: a shard's samples with at least one row, in id order, in groups of
``micro_batch_size`` (the last one padded with empty rows), ``num_microbatches`` of them per call of
megatron-core's schedule (no pipelining, or 1F1B with PP), each call padded to its longest sample
rounded up to ``pad_multiple`` (at most ``seq_length``). Nothing depends on the DP size, the rank or
a seed, so the bytes of a shard are the same whichever rank computes it, in whatever run.

The last stage's "loss function" is ``teacher_topk`` on the vocab-parallel logits of the real
positions (collect_non_loss_data: the schedule hands back its outputs; no loss, no backward).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import __version__ as megatron_core_version
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
)

from rgkd_megatron.cache.codec import encode_logprobs
from rgkd_megatron.cache.format import ShardArrays
from rgkd_megatron.cache.manifest import load_manifest, new_identity
from rgkd_megatron.cache.options import BuildOptions
from rgkd_megatron.cache.topk import teacher_topk
from rgkd_megatron.cache.writer import CacheWriter
from rgkd_megatron.parallel.groups import RoleGroups
from rgkd_megatron.utils.logging import get_logger
from rgkd_megatron.utils.progress import ProgressBar

__all__ = ["BuildOptions", "build_identity", "build_teacher_cache", "run_teacher_forward", "shard_calls"]

logger = get_logger(__name__)


def build_identity(
    options: BuildOptions, teacher: dict, dataset, vocab_size: int, layout, device: str
) -> tuple[dict, np.ndarray]:
    """(manifest without shards, row offsets [N + 1]) for this dataset, teacher and options."""
    options.validate()
    return new_identity(
        teacher=teacher,
        tokenizer_fingerprint=dataset.tokenizer_fingerprint,
        vocab_size=vocab_size,
        dataset={
            "fingerprint": dataset.fingerprint,
            "num_tokens": int(dataset.num_tokens),
            "path": getattr(dataset, "prefix", None),
        },  # fmt: skip
        lengths=dataset.lengths,
        k=options.k,
        temperature=options.temperature,
        dtype=options.dtype,
        seq_length=options.seq_length,
        rows_per_shard=options.rows_per_shard,
        block_rows=options.block_rows,
        build={
            "micro_batch_size": options.micro_batch_size,
            "num_microbatches": options.num_microbatches,
            "pad_multiple": options.pad_multiple,
            "tp": layout.tp,
            "pp": layout.pp,
            "device": device,
            "versions": {"torch": torch.__version__, "megatron_core": megatron_core_version},
        },
    )


# --------------------------------------------------------------------------------------------------
# the teacher forward (megatron-core schedules, forward only)


def _rows_from_logits(options: BuildOptions, tp_group, vocab_size: int, keep: bool, batch: dict, logits_bsv,
                      non_loss_data: bool = True):  # fmt: skip
    """Last stage: cache rows of the real positions, in (row, position) order; numpy when ``keep``."""
    flat_tv = logits_bsv.reshape(-1, logits_bsv.shape[-1])
    valid = batch["valid"].reshape(-1)
    if not bool(valid.all()):
        flat_tv = flat_tv[valid.to(flat_tv.device)]
    rows = teacher_topk(
        flat_tv, options.k, temperature=options.temperature, tp_group=tp_group, vocab_size=vocab_size
    )
    if not keep:
        return None
    return ShardArrays(
        encode_logprobs(rows.logprobs, options.dtype),
        rows.ids.to(torch.int32).cpu().numpy(),
        rows.lse.float().cpu().numpy(),
        rows.tail.float().cpu().numpy(),
    )


def run_teacher_forward(model, groups: RoleGroups, batches: list[dict], loss_func, seq_length: int) -> list:
    """megatron-core forward-only schedule over ``batches`` (dicts with tokens/position_ids [b, s]);
    returns ``loss_func(batch, logits)`` per micro-batch on the last stage ([] elsewhere)."""
    pg = groups.pg_collection
    pipelined = groups.layout.pp > 1

    def forward_step(data_iterator, module):
        batch = next(data_iterator)
        output = module(batch["tokens"], batch["position_ids"], None)
        return output, partial(loss_func, batch)

    schedule = (
        forward_backward_pipelining_without_interleaving if pipelined else forward_backward_no_pipelining
    )
    with torch.no_grad():
        return schedule(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model] if pipelined else model,
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=batches[0]["tokens"].shape[0],
            forward_only=True,
            collect_non_loss_data=True,
            p2p_communicator=P2PCommunicator(pp_group=pg.pp, config=model.config) if pipelined else None,
            pg_collection=pg,
        )


def _micro_batch(dataset, samples: list[int], rows: np.ndarray, length: int, mbs: int, device) -> dict:
    tokens = np.zeros((mbs, length), dtype=np.int64)
    valid = np.zeros((mbs, length), dtype=bool)
    for j, i in enumerate(samples):
        n = int(rows[i])
        tokens[j, :n] = dataset[i][0][:n]
        valid[j, :n] = True
    return {
        "tokens": torch.from_numpy(tokens).to(device),
        "position_ids": torch.arange(length, device=device).expand(mbs, length),
        "valid": torch.from_numpy(valid),
    }


def shard_calls(
    dataset, shard: dict, rows: np.ndarray, options: BuildOptions, device
) -> Iterator[tuple[list, int]]:
    """The canonical schedule calls of a shard: (micro-batches, padded length) per call (module docstring)."""
    first = shard["first_sample"]
    samples = [i for i in range(first, first + shard["num_samples"]) if rows[i] > 0]
    mbs, per_call = options.micro_batch_size, options.num_microbatches
    micro = [samples[j : j + mbs] for j in range(0, len(samples), mbs)]
    for c in range(0, len(micro), per_call):
        call = micro[c : c + per_call]
        longest = max(int(rows[i]) for mb in call for i in mb)
        length = min(options.seq_length, -(-longest // options.pad_multiple) * options.pad_multiple)
        yield [_micro_batch(dataset, mb, rows, length, mbs, device) for mb in call], length


def _compute_shard(model, groups, dataset, shard, rows, options, vocab_size, keep, bar, device):
    """Teacher rows of one shard (ShardArrays on the writing rank, None elsewhere)."""
    arrays = ShardArrays.empty(shard["num_rows"], options.k, options.dtype) if keep else None
    cursor = 0
    loss_func = partial(_rows_from_logits, options, groups.pg_collection.tp, vocab_size, keep)
    for batches, length in shard_calls(dataset, shard, rows, options, device):
        outputs = run_teacher_forward(model, groups, batches, loss_func, length)
        if keep:
            for out in outputs:
                n = out.lse.shape[0]
                for name in ("logprobs", "ids", "lse", "tail"):
                    getattr(arrays, name)[cursor : cursor + n] = getattr(out, name)
                cursor += n
        done = sum(int(b["valid"].sum()) for b in batches)
        bar.update(done, tokens=done)
    if keep and cursor != shard["num_rows"]:
        raise RuntimeError(f"shard rows {cursor} != planned {shard['num_rows']}")
    return arrays


# --------------------------------------------------------------------------------------------------
# the build


def _broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def build_teacher_cache(
    model: torch.nn.Module,
    groups: RoleGroups,
    dataset,
    directory: str,
    options: BuildOptions,
    identity: dict,
    row_offsets: np.ndarray,
    overwrite: bool = False,
) -> dict | None:
    """Build (or resume, or find complete) the cache in ``directory``; collective over the world.

    ``identity``/``row_offsets`` come from ``build_identity``. Returns the manifest on rank 0 when the
    cache is complete after this call, None elsewhere or when ``max_shards`` left shards pending.
    """
    rank = dist.get_rank()
    writer = CacheWriter(directory, identity, row_offsets)
    status: tuple = ("ok", None)
    if rank == 0:
        try:
            status = ("ok", writer.prepare(overwrite))
        except (ValueError, OSError) as exc:
            status = ("error", f"{type(exc).__name__}: {exc}")
    status = _broadcast(status)
    if status[0] == "error":
        raise ValueError(status[1])
    pending = status[1]
    if pending is None:
        logger.info("teacher cache %s is already complete", directory)
        dist.barrier()
        return load_manifest(directory) if rank == 0 else None
    if options.max_shards is not None:
        pending = pending[: options.max_shards]
    dp, dp_rank = groups.layout.dp, groups.dp_rank
    mine = pending[dp_rank::dp]
    keep = groups.is_last_stage and groups.tp_rank == 0
    rows = np.diff(writer.row_offsets)
    logger.info(
        "teacher cache %s: %d shards planned, %d pending in this run; DP rank %d builds %d",
        directory, len(writer.plan), len(pending), dp_rank, len(mine),
    )  # fmt: skip
    device = next(model.parameters()).device
    total = sum(writer.plan[i]["num_rows"] for i in mine)
    with ProgressBar(
        total, desc=f"teacher cache (DP rank 0 of {dp})", enabled=options.progress, unit="tok"
    ) as bar:
        for index in mine:
            shard = writer.plan[index]
            arrays = _compute_shard(
                model, groups, dataset, shard, rows, options, identity["vocab_size"], keep, bar, device
            )
            if keep:
                writer.commit(index, arrays)
    dist.barrier()
    manifest = None
    if rank == 0:
        if not writer.pending():
            manifest = writer.finalize()
            logger.info(
                "teacher cache %s complete: %d shards, %d rows",
                directory,
                len(manifest["shards"]),
                manifest["num_rows"],
            )
        else:
            logger.info(
                "teacher cache %s: %d shards still pending (rerun to resume)",
                directory,
                len(writer.pending()),
            )
    dist.barrier()
    return manifest
