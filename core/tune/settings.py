"""The settings of fine-tuning and alignment: which parameters train (`PeftConfig`), how PPO samples and
updates (`PPOConfig`), how DPO weighs a preference (`DPOConfig`).

Each field's docstring is the help of the flag that sets it (`glm finetune --lora-rank`, `glm align
--kl-coef`, read through core/field_docs.py), and each default is the flag's default, so a setting is
declared here once. Importing this module does not import torch: every `glm` invocation builds the help
of every command.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from glm_cli.core.errors import UsageError

METHODS = ("lora", "adapter", "prompt")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True, slots=True)
class PeftConfig:
    method: str = "lora"
    """lora | adapter | prompt."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input (training only)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Linear layers LoRA wraps, by name (`all-linear` expands to every projection of every block)."""
    adapter_dim: int = 16
    """Bottleneck width of the adapter layers."""
    prompt_tokens: int = 16
    """Number of soft-prompt vectors for prompt tuning."""

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.rank < 1 or self.adapter_dim < 1 or self.prompt_tokens < 1:
            problems.append("rank, adapter dim and prompt tokens must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.targets == ["all-linear"]:
            self.targets = list(LINEAR_NAMES)
        unknown = [t for t in self.targets if t not in LINEAR_NAMES]
        if unknown:
            problems.append(f"unknown LoRA target(s) {', '.join(unknown)}; choose from all-linear, "
                            + ", ".join(LINEAR_NAMES))
        if problems:
            raise UsageError("; ".join(problems))


@dataclass(kw_only=True, slots=True)
class PPOConfig:
    rollout_size: int = 16
    """Prompts sampled per rollout."""
    minibatch_size: int = 8
    """Rollout rows per optimizer step."""
    ppo_epochs: int = 2
    """Passes over each rollout."""
    max_new_tokens: int = 24
    """Longest sampled answer."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty to the reference model."""
    clip: float = 0.2
    """Policy ratio clip epsilon."""
    value_clip: float = 0.2
    """Value clip epsilon: a new value estimate moves at most this far from the rollout's."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    gamma: float = 1.0
    """Discount of future rewards."""
    lam: float = 0.95
    """GAE lambda: the bias-variance trade-off of the advantage estimate."""
    whiten: bool = True
    """Normalize advantages over each rollout."""


@dataclass(kw_only=True, slots=True)
class DPOConfig:
    beta: float = 0.1
    """Strength of the implicit KL constraint."""
    label_smoothing: float = 0.0
    """Assumed share of flipped preference labels (cDPO / robust)."""
    loss_type: str = "sigmoid"
    """sigmoid (cDPO with label smoothing) or robust (Chowdhury et al.)."""
