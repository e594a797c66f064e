"""Teacher top-k cache (docs/design.md, the teacher top-k cache): per token, the teacher's top-k log-probs, ids, log-sum-exp
and tail mass, sharded, keyed by (dataset, sample id, token offset), built once and read many times.

- ``format``: the binary shard format (header, column sections, per-block crc32), atomic shard writes.
- ``codec``: the row encodings (storage dtypes, q8 log-probs, packed ids), encode / decode.
- ``manifest``: keying, shard plan, fingerprints, manifest I/O, compatibility checks.
- ``topk``: the vocab-parallel top-k / log-sum-exp / tail computation on teacher logits.
- ``writer``: the cache directory during a build (resume, commit, finalise).
- ``builder``: the teacher forward over a dataset on megatron-core (``tools/build_teacher_cache.py``).
- ``reader``: memory-mapped random access, validation, prefetching.

- ``options``: ``BuildOptions``, what a build stores (imports neither torch nor megatron-core).

Importing this package imports neither torch nor megatron-core: the names below are loaded on
first use (``reader`` and ``topk`` need torch); ``builder`` imports megatron-core.
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "CacheMismatchError": "manifest",
    "check_compatible": "manifest",
    "load_manifest": "manifest",
    "CacheCorruptionError": "reader",
    "TeacherCacheReader": "reader",
    "TopKRows": "reader",
    "TeacherTopK": "topk",
    "teacher_topk": "topk",
}

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


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"rgkd_megatron.cache.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'rgkd_megatron.cache' has no attribute {name!r}")
