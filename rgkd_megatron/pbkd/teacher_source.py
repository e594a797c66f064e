"""Where white-box methods get the teacher's top-k distribution from.

- ``live_teacher_topk``: a no-grad forward of the teacher role on the batch (any rows: teacher responses,
  student samples, preference pairs). Exact top-k + tail at the requested temperature.
- ``CachedTeacher``: the precomputed sharded top-k cache (``tools/build_teacher_cache.py``), for
  rows that are the teacher's responses (off-policy). The cache is keyed by (dataset fingerprint,
  sample id, token offset): the prompt set is tokenized into an indexed dataset exactly as the cache
  builder's input was, the reader refuses a cache whose tokenizer / vocab / dataset / temperature do
  not match, and every row is checked against that dataset's tokens before use.
"""

from __future__ import annotations

import torch

from rgkd_megatron.generation.generate import broadcast_from_last_stage, inference_mode, stage_forward


def live_teacher_topk(teacher, groups, tokens_bs: torch.Tensor, k: int, temperature: float, vocab_size: int):
    """Teacher top-k ids and log-probs (at ``temperature``, real vocab only) per position, on every
    rank: ([b, s, k] int64, [b, s, k] fp32)."""
    b, s = tokens_bs.shape
    ids = logprobs = None
    with inference_mode(teacher):
        logits_bsv = stage_forward(teacher, groups, tokens_bs, 0, None, gather=True)
        if groups.is_last_stage:
            logp = torch.log_softmax(logits_bsv[..., :vocab_size].float() / temperature, dim=-1)
            logprobs, ids = logp.topk(k, dim=-1)
    ids = broadcast_from_last_stage(
        ids.double() if ids is not None else None, (b, s, k), torch.float64, groups
    )
    logprobs = broadcast_from_last_stage(logprobs, (b, s, k), torch.float32, groups)
    return ids.long(), logprobs


class CachedTeacher:
    """Teacher buckets of the prompt set's teacher responses, read from a top-k cache."""

    def __init__(
        self,
        cache_path: str,
        prompts_jsonl: str,
        tokenizer,
        vocab_size: int,
        temperature: float,
        work_dir,
        kd_topk: int | None = None,
    ):
        from rgkd_megatron.cache.manifest import load_manifest
        from rgkd_megatron.cache.reader import TeacherCacheReader
        from rgkd_megatron.data.indexed_dataset import IndexedDataset
        from rgkd_megatron.data.preprocess import tokenize_once

        cache_k = load_manifest(cache_path)["k"]
        if kd_topk is not None and kd_topk != cache_k:
            raise ValueError(
                f"pbkd.kd_topk: {kd_topk}, but the teacher cache {cache_path} holds k={cache_k}; set "
                f"pbkd.kd_topk={cache_k} (or leave it unset to take the cache's k), or rebuild the cache "
                f"with --kd-top-k {kd_topk}"
            )
        prefix = str(work_dir / "prompts_tokenized")
        tokenize_once(prompts_jsonl, tokenizer.path, prefix)
        self.dataset = IndexedDataset(prefix)
        self.reader = TeacherCacheReader(
            cache_path,
            tokenizer_fingerprint=tokenizer.fingerprint,
            vocab_size=vocab_size,
            dataset_fingerprint=self.dataset.fingerprint,
            temperature=temperature,
        )
        self.k = self.reader.k

    def buckets(
        self, prompt_ids: list[int], batch: dict, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [b, s, k] int64, logprobs [b, s, k] fp32, tail [b, s] fp32) on ``device`` (default:
        ``loss_device()``, where the loss runs) for rows that are teacher responses of the prompts
        ``prompt_ids`` (row i = sample prompt_ids[i] of the dataset); padding positions are zero.

        On a GPU the stored bytes travel (``reader.gather_compact``: 199 bytes/token at k = 64, q8,
        pinned, copied asynchronously) and are decoded there; on the CPU ``reader.gather`` decodes
        the same stored rows straight from the shards (no staging copy). Either way the values of
        ``reader.gather``, bit for bit."""
        tokens = batch["tokens"]
        b, s = tokens.shape
        sample_ids = torch.full((b, s), -1, dtype=torch.long)
        for row, sample in enumerate(prompt_ids):
            cached, _ = self.dataset[sample]
            n = min(len(cached), s)
            if not torch.equal(tokens[row, :n].cpu(), torch.as_tensor(cached[:n].astype("int64"))):
                raise ValueError(
                    f"teacher cache: row {row} (prompt {sample}) differs from the tokenized prompt set "
                    f"{self.dataset.prefix}: the prompt set or its prompt template changed since the cache "
                    "was built; rebuild the cache from this prompt set and tokenizer"
                )
            sample_ids[row, : n - 1] = sample
        where = loss_device() if device is None else torch.device(device)
        positions = torch.arange(s).expand(b, s)
        if where.type == "cpu":
            got = self.reader.gather(sample_ids, positions)
        else:
            compact = self.reader.gather_compact(sample_ids, positions, pin_memory=where.type == "cuda")
            got = compact.to(where, non_blocking=True).decode()
        return got["ids"].long(), got["logprobs"].float(), got["tail"]


def loss_device() -> torch.device:
    """Where the student's logits and the KD loss live: the current CUDA device, else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
