"""Checkpoint conversion: Hugging Face Llama-family <-> megatron-core, GGUF import, teacher pruning.

Modules (one job each; the CLIs in ``tools/`` are thin wrappers):

- ``hf_mapping``: HF config -> architecture (+ our ``model`` config section) and the tensor mapping
  (names, QKV/[gate; up] layouts, vocab padding); pure functions.
- ``plan``: the ``--dry-run`` report: tensor table and size per rank for a TP/PP layout.
- ``hf_io``: lazy safetensors reading, size-capped shard writing.
- ``lazy_save``: write a megatron-core dist checkpoint one chunk at a time (a meta-device model
  provides the layout).
- ``hf_to_mcore`` / ``mcore_to_hf``: the two directions (``tools/convert_checkpoint.py``).
- ``gguf_import``: GGUF (llama) -> HF directory with tokenizer files (``tools/import_gguf.py``).
- ``prune``: depth + FFN-width pruning of a teacher into a student (``tools/prune_teacher.py``).
- ``common``: ``ConversionError``, atomic output directories, dtypes, the single-process group.

Importing this package is cheap; megatron-core, gguf and transformers are imported where used.
"""

from rgkd_megatron.convert.common import ConversionError

__all__ = ["ConversionError"]
