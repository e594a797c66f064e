"""Teacher top-k cache (docs/design.md, the teacher top-k cache): per token, the teacher's top-k log-probs, ids, log-sum-exp
and tail mass, sharded, keyed by (dataset, sample id, token offset), built once and read many times.

- ``format``: the binary shard format (header, column sections, per-block crc32), atomic shard writes.
- ``manifest``: keying, shard plan, fingerprints, manifest I/O, compatibility checks.
- ``topk``: the vocab-parallel top-k / log-sum-exp / tail computation on teacher logits.
- ``writer``: the cache directory during a build (resume, commit, finalise).
- ``builder``: the teacher forward over a dataset on megatron-core (``tools/build_teacher_cache.py``).
- ``reader``: memory-mapped random access, validation, prefetching.

Importing this package does not import megatron-core; ``builder`` does.
"""

from rgkd_megatron.cache.manifest import CacheMismatchError, check_compatible, load_manifest
from rgkd_megatron.cache.reader import CacheCorruptionError, TeacherCacheReader, TopKRows
from rgkd_megatron.cache.topk import TeacherTopK, teacher_topk

__all__ = [
    "CacheCorruptionError",
    "CacheMismatchError",
    "TeacherCacheReader",
    "TeacherTopK",
    "TopKRows",
    "check_compatible",
    "load_manifest",
    "teacher_topk",
]
