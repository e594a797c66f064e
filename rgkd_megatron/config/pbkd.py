"""Config of the distillation method (the ``pbkd`` section): PbKD, MM-PbKD and the KD baselines.

Every constant of docs/design.md (the algorithm) is a field here. Validation of this section lives in
``validate_pbkd`` (called by ``validate_config``), so the generic loader stays small. The choices of
``method`` are the registered methods (``rgkd_megatron.methods``), and what a method requires of the
other fields is read from its ``MethodSpec``.
"""

from dataclasses import dataclass
from typing import Literal

from rgkd_megatron.methods import get_method, method_names
from rgkd_megatron.methods.judge_plugins import check_judge_name

MethodName = Literal[method_names()]  # type: ignore[valid-type]  # the registered methods, in order


@dataclass
class PbKDConfig:
    """Reward-guided distillation (docs/design.md, the algorithm) and its baselines."""

    method: MethodName = "pbkd"
    """pbkd (black-box min-max), mm_pbkd (white-box Q-function), seqkd, or a token-level KD baseline."""
    label: str = ""
    """Name of this configuration in summaries and reports (``rgkd-eval`` groups runs by it); empty =
    the method. E.g. ``pbkd_lambda0`` for the ``bt_lambda=0`` ablation."""
    prompts_path: str = ""
    """JSONL of {prompt, response[, reference]}: prompts with the teacher's responses."""
    heldout_fraction: float = 0.2
    """Share of prompts held out for evaluation (chosen by a seeded shuffle)."""
    heldout_seed: int = 0
    """Seed of the held-out split, separate from train.seed so that every training seed is
    evaluated on the same prompts (paired comparisons across methods and seeds)."""
    teacher_samples_path: str | None = None
    """JSONL of teacher responses sampled at the rollout temperature (``tools/generate_responses.py
    --temperature 1 --num-samples N``): the reward model's teacher side, paired by prompt with the
    student's samples. Without it the greedy responses stand in (a warning says the RM can then
    separate greedy from sampled text instead of teacher from student)."""
    rounds: int = 2
    """Online rounds T (1 = offline: pairs only from the initial student)."""
    pairs_per_round: int = 16
    """Prompts sampled from the student and judged per round."""
    iterations_per_round: int = 4
    """Min-max iterations per round; each runs k_r RM steps then k_p policy steps."""
    k_r: int = 1
    """Reward-model steps per iteration."""
    k_p: int = 1
    """Policy steps per iteration."""
    samples_per_prompt: int = 4
    """n: student samples per prompt for the RLOO/group baseline."""
    prompts_per_step: int = 4
    """Prompts per policy step (x samples_per_prompt responses)."""
    reward_bound: float = 5.0
    """B: rewards are B * tanh(raw / B)."""
    bt_lambda: float = 1.0
    """lambda: weight of the Bradley-Terry confidence-set penalty."""
    kl_beta: float = 0.05
    """beta: KL(pi_theta || pi_ref) coefficient in the policy step."""
    seqkd_alpha: float = 0.0
    """alpha: weight of the SeqKD anchor (NLL of teacher responses) in the policy step."""
    ppo_clip: float | None = None
    """PPO clip epsilon; null = plain REINFORCE with the RLOO baseline."""
    rm_lr: float = 1.0e-4
    """Reward-model learning rate."""
    rm_warmup_steps: int = 0
    """Extra reward-model steps before the first policy step (the discriminator warm-up), on the
    first round's student samples."""
    rm_magnitude_coef: float = 0.01
    """c: + c * mean raw^2 in the RM loss; keeps the reward off its tanh bound (pins the free offset)."""
    advantage_norm: Literal["none", "std"] = "std"
    """Policy-gradient advantages: RLOO baseline, then divided by the group's reward std ("std",
    group-normalised as in GRPO/GAD) or not ("none")."""
    q_bound: float | None = None
    """MM-PbKD: per-token bound of the Q head (null = reward_bound)."""
    judge: Literal["teacher_wins", "teacher_loglik", "rouge_reference", "entry_point", "label_file"] = (
        "teacher_wins"
    )
    """Judge labelling (teacher, student) pairs. teacher_wins makes the BT term repeat the gap term
    (the confidence set never binds); rouge_reference (ROUGE-L against the prompt's reference) and
    the others can prefer the student."""
    judge_entry_point: str | None = None
    """For judge=entry_point: the name of a judge (prompt, response) -> score that an installed package
    registered in the ``rgkd_megatron.judges`` entry-point group (docs/guide.md, 'User judges'); a
    'module:function' string is refused: a config never names code to import."""
    judge_label_file: str | None = None
    """JSONL {prompt_id, preferred: teacher|student|tie}, for judge=label_file."""
    tie_tolerance: float = 0.0
    """Score differences within this are ties (score-based judges)."""
    gamma: float = 1.0
    """Discount of the token-level return (MM-PbKD)."""
    beta_mm: float = 0.5
    """MM-PbKD mix of on-policy (student prefixes) and off-policy (teacher prefixes) moment terms."""
    kd_beta: float = 0.5
    """JSD mixture weight (GKD convention)."""
    kd_alpha: float = 0.1
    """Skew KL mixture weight (DistiLLM)."""
    kd_temperature: float = 1.0
    """Temperature of token-level KD (must match the cache's)."""
    kd_topk: int | None = None
    """k: teacher ids kept per token for token-level KD (the rest is one tail bucket). Null = the
    teacher cache's k with ``cache_path``, else 64; a value that differs from the cache's k is refused."""
    on_policy: bool = False
    """Token-level KD on student samples with a live teacher (GKD) instead of teacher responses."""
    cache_path: str | None = None
    """Teacher top-k cache (white-box methods, off-policy)."""
    teacher_load: str | None = None
    """Teacher checkpoint for live scoring: a megatron dist ckpt dir or a Hugging Face folder
    (config.json + safetensors)."""
    teacher_model_config: str | None = None
    """YAML with the teacher's model section (written next to converted checkpoints); null = the
    architecture of pbkd.teacher_load (its config.json or model_config.yaml)."""
    max_new_tokens: int = 48
    """Generation length limit for student samples and evaluation."""
    temperature: float = 1.0
    """Sampling temperature for student rollouts."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts."""
    top_k: int = 0
    """Top-k sampling for rollouts (0 = off)."""


_POSITIVE = ("rounds", "pairs_per_round", "iterations_per_round", "samples_per_prompt", "prompts_per_step",
             "reward_bound", "rm_lr", "max_new_tokens", "temperature", "kd_temperature")  # fmt: skip
_NON_NEGATIVE = ("k_r", "k_p", "bt_lambda", "kl_beta", "seqkd_alpha", "tie_tolerance", "top_k",
                 "rm_warmup_steps", "rm_magnitude_coef", "heldout_seed")  # fmt: skip
DEFAULT_KD_TOPK = 64
_UNIT = ("heldout_fraction", "gamma", "beta_mm", "top_p")


def live_kd_topk(cfg: PbKDConfig) -> int:
    """k of token-level KD against a live teacher (``pbkd.kd_topk``, default 64)."""
    return DEFAULT_KD_TOPK if cfg.kd_topk is None else cfg.kd_topk


def validate_pbkd(cfg: PbKDConfig) -> list[str]:
    """Problems of the ``pbkd`` section, each naming its field (empty list = valid)."""
    errors = []
    for name in _POSITIVE:
        if getattr(cfg, name) <= 0:
            errors.append(f"pbkd.{name}: expected a value > 0, got {getattr(cfg, name)}")
    for name in _NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            errors.append(f"pbkd.{name}: expected a value >= 0, got {getattr(cfg, name)}")
    for name in _UNIT:
        if not 0 <= getattr(cfg, name) <= 1:
            errors.append(f"pbkd.{name}: expected a value in [0, 1], got {getattr(cfg, name)}")
    if cfg.k_r == 0 and cfg.k_p == 0:
        errors.append("pbkd.k_r: k_r and k_p are both 0: an iteration would do nothing")
    policy_gradient = cfg.method in method_names() and get_method(cfg.method).policy_gradient
    if cfg.samples_per_prompt < 2 and policy_gradient:
        errors.append(
            f"pbkd.samples_per_prompt: RLOO needs >= 2 samples per prompt, got {cfg.samples_per_prompt}"
        )
    if policy_gradient and (cfg.temperature != 1.0 or cfg.top_p < 1.0 or cfg.top_k > 0):
        errors.append(
            f"pbkd.temperature: {cfg.method}'s REINFORCE/PPO/KL estimators assume unfiltered samples from the "
            f"policy at temperature 1 (got temperature={cfg.temperature}, top_p={cfg.top_p}, top_k={cfg.top_k}); "
            "the importance correction for other sampling settings is not implemented"
        )
    if cfg.kd_topk is not None and cfg.kd_topk <= 0:
        errors.append(f"pbkd.kd_topk: expected null or a value > 0, got {cfg.kd_topk}")
    if cfg.q_bound is not None and cfg.q_bound <= 0:
        errors.append(f"pbkd.q_bound: expected null or a value > 0, got {cfg.q_bound}")
    if cfg.ppo_clip is not None and cfg.ppo_clip <= 0:
        errors.append(f"pbkd.ppo_clip: expected null or a value > 0, got {cfg.ppo_clip}")
    if not 0 < cfg.kd_beta < 1:
        errors.append(f"pbkd.kd_beta: expected a value in (0, 1), got {cfg.kd_beta}")
    if not 0 <= cfg.kd_alpha < 1:
        errors.append(f"pbkd.kd_alpha: expected a value in [0, 1), got {cfg.kd_alpha}")
    if cfg.judge == "entry_point" and not cfg.judge_entry_point:
        errors.append("pbkd.judge_entry_point: required when pbkd.judge is entry_point")
    elif cfg.judge == "entry_point":
        problem = check_judge_name(cfg.judge_entry_point)
        if problem:
            errors.append(problem)
    if cfg.judge == "label_file" and not cfg.judge_label_file:
        errors.append("pbkd.judge_label_file: required when pbkd.judge is label_file")
    return errors
