"""The config tree: one dataclass per section, the single source of truth for every knob.

Design:
- Plain dataclasses, no framework. Each field carries a one-line docstring right under it.
- The defaults describe a tiny model that trains in seconds on CPU (the CI recipe).
- Fields with a fixed set of values are typed ``Literal[...]``; the loader checks the choices from
  the type hint, so the allowed values are written in exactly one place.
- Parsing YAML, overrides and validation live in ``loader.py``; this module has no logic.

Usage::

    from rgkd_megatron.config import RGKDConfig, load_config
    cfg = load_config("examples/tiny_sft.yaml", ["train.lr=1e-4"])
"""

from dataclasses import dataclass, field
from typing import Literal

from rgkd_megatron.config.pbkd import PbKDConfig
from rgkd_megatron.config.placement import PlacementConfig, ScheduleConfig


@dataclass
class ModelConfig:
    """Architecture of the (student) GPT model: Llama-style, RMSNorm + SwiGLU + RoPE."""

    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Width of the residual stream."""
    ffn_hidden_size: int = 176
    """Inner width of the SwiGLU MLP."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: int | None = None
    """Number of key/value heads for grouped-query attention; None = multi-head attention."""
    vocab_size: int | None = None
    """Vocabulary size before padding; None = take it from the tokenizer."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (times the TP size)."""
    max_position_embeddings: int = 256
    """Longest sequence the position encoding is set up for."""
    rotary_base: float = 10000.0
    """RoPE base frequency (theta)."""
    rotary_scaling_factor: float | None = None
    """RoPE context-extension scaling factor (Llama-3.1 style); None = no scaling."""
    norm_epsilon: float = 1e-5
    """Epsilon of the RMSNorm layers."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the output projection weights."""
    add_qkv_bias: bool = False
    """Add a bias to the QKV projection (Qwen-style)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    spec: Literal["auto", "local", "te"] = "auto"
    """Layer spec: te = Transformer Engine, local = pure torch, auto = te when importable."""
    params_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Parameter/compute dtype; auto = bf16 on GPU, fp32 on CPU."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (core attention) or full (whole layers)."""
    fp8: Literal["none", "e4m3", "hybrid"] = "none"
    """FP8 GEMMs through Transformer Engine (needs the TE spec, bf16 params, an sm89+ GPU): e4m3
    everywhere, or hybrid (e4m3 forward, e5m2 gradients); none = off."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """TE FP8 scaling recipe when model.fp8 is on: delayed (amax history), tensorwise (current
    scaling, TE >= 2.2), blockwise (TE >= 2.3), mxfp8 (Blackwell only)."""
    kd_kernel: Literal["auto", "torch", "triton"] = "auto"
    """Sparse top-k KD loss kernels: triton (needs triton + CUDA), torch (reference, runs
    everywhere), auto = triton on CUDA when importable, torch otherwise."""
    kd_chunk_budget_mib: float = 256.0
    """Memory budget (MiB) of the sparse KD losses' per-chunk [chunk, vocab] work tensors: the token
    chunk is the largest whose work tensors fit it (rgkd_megatron/losses/chunking.py)."""
    load: str | None = None
    """Checkpoint to initialise the weights from: a megatron checkpoint or a Hugging Face folder
    (config.json + safetensors), detected by its files; None = random initialisation. The
    architecture fields the recipe does not set are read from it (config.json, or the
    model_config.yaml beside a megatron checkpoint); a field set to another value is an error."""


@dataclass
class ParallelConfig:
    """Parallel layout and communication options."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (TP)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (PP)."""
    sequence_parallel: bool = False
    """Shard layer norms and dropout along the sequence over the TP group (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over the data-parallel group (ZeRO-1)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo without."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the forward pass."""


@dataclass
class OptimizerConfig:
    """Optimizer hyper-parameters (the learning-rate schedule is in ``train``)."""

    name: Literal["adam", "sgd"] = "adam"
    """Optimizer: adam (AdamW, decoupled weight decay) or sgd."""
    weight_decay: float = 0.01
    """Decoupled weight decay coefficient."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.95
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 = no clipping."""
    impl: Literal["auto", "te", "apex", "torch"] = "auto"
    """Optimizer implementation: auto = megatron-core's import-time choice (TE FusedAdam > apex
    FusedAdam > torch AdamW); te/apex/torch = require that one (error if megatron-core uses another)."""


@dataclass
class DataConfig:
    """Training data and tokenizer."""

    train_path: str = ""
    """JSONL file of {prompt, response} records, or a preprocessed dataset prefix."""
    valid_path: str | None = None
    """Validation data in the same format as train_path; None = no validation set."""
    tokenizer: str = ""
    """Path of a HF tokenizer.json (or its directory) or a sentencepiece .model file."""
    seq_length: int = 128
    """Tokens per training sequence (prompt + response, truncated or padded)."""
    packing: bool = False
    """Pack several short samples into one sequence instead of padding each."""


@dataclass
class TrainConfig:
    """Training loop, batch sizes and learning-rate schedule."""

    train_iters: int = 20
    """Number of optimizer steps."""
    micro_batch_size: int = 2
    """Sequences per forward/backward pass on one data-parallel rank."""
    global_batch_size: int = 4
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 2
    """Linear warm-up steps from 0 to lr."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to min_lr after warm-up."""
    seed: int = 1234
    """Random seed (weights, data order, sampling)."""
    log_interval: int = 1
    """Log metrics every this many steps."""
    save_interval: int = 0
    """Save a checkpoint every this many steps (rgkd-distill: iterations, of the whole loop: every
    role's model and optimizer, the plan cursor, preference pairs, RNG); 0 = only at the end. A run
    resumes from ``<logging.run_dir>/checkpoints/latest`` automatically."""
    keep_last_checkpoints: int = 2
    """Keep this many newest checkpoints and delete older ones once a newer one is complete and
    verified (the one a run resumed from is never deleted); 0 = keep every checkpoint."""
    keep_checkpoint_every: int = 0
    """Also keep every checkpoint whose iteration is a multiple of this; 0 = none besides the last."""
    eval_interval: int = 0
    """Evaluate on valid_path every this many steps; 0 = never during training."""


@dataclass
class LoggingConfig:
    """Where the run writes and what it reports."""

    run_dir: str = "runs/default"
    """Directory for the resolved config, checkpoints, logs and metrics."""
    wandb: bool = False
    """Log metrics to Weights & Biases."""
    wandb_project: str = "rgkd"
    """wandb project name."""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """wandb mode; offline writes under run_dir and syncs later."""
    tensorboard: bool = False
    """Write TensorBoard event files under run_dir."""
    export_hf: bool = True
    """At the end, also write the student as a Hugging Face checkpoint (``<run_dir>/student_hf``:
    config, tokenizer, chat template, safetensors) beside the megatron one (``<run_dir>/student``)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Level of the rank-aware logger."""


@dataclass
class RGKDConfig:
    """Root of the config tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data and tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop and schedule."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Outputs and metrics."""
    pbkd: PbKDConfig = field(default_factory=PbKDConfig)
    """Distillation method (PbKD, MM-PbKD, KD baselines)."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Where the policy, reward and teacher roles run (colocated or each on its own rank window)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """How policy and reward steps interleave (overlap, staleness bound)."""
