"""Data layer: tokenizers, the memory-mapped tokenized dataset, SFT collation and the batch sampler.

- ``tokenizer``: ``load_tokenizer`` for HF ``tokenizers`` JSON and sentencepiece models.
- ``indexed_dataset``: ``write_indexed_dataset`` / ``IndexedDataset`` (bin + idx + json, atomic, checked).
- ``batching``: ``make_sft_sample``, ``collate_padded``, ``collate_packed``, ``MicroBatchSampler``.

Build a dataset with ``tools/preprocess_data.py``; see each module's docstring for formats and shapes.
"""

from rgkd_megatron.data.batching import MicroBatchSampler, collate_packed, collate_padded, make_sft_sample
from rgkd_megatron.data.indexed_dataset import IndexedDataset, write_indexed_dataset
from rgkd_megatron.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "IndexedDataset",
    "MicroBatchSampler",
    "Tokenizer",
    "collate_packed",
    "collate_padded",
    "load_tokenizer",
    "make_sft_sample",
    "write_indexed_dataset",
]
