"""PPO for language models, as InstructGPT (Ouyang et al. 2022) describes it; the math is here, the loop
is the engine's.

One rollout: sample answers from the policy for a batch of prompts; score each answer with the reward
model; per token, the reward is -kl_coef * (log pi - log ref) (an estimate of the KL to the reference
model), plus the reward-model score on the answer's last token. A value head on the policy's hidden
states estimates the return; generalized advantage estimation (Schulman et al. 2016) turns rewards and
values into advantages. Then several epochs of minibatch updates on the rollout, each minimizing

    policy: mean over answer tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps)),  r = pi / pi_old
    value:  0.5 * mean of max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)

total = policy + vf_coef * value. Reported: reward (RM score), KL to the reference (per answer, summed
over tokens), clip fraction, approximate KL between the new and the rollout policy.
"""

from __future__ import annotations

import torch

from glm_cli.core.tune.settings import PPOConfig  # noqa: F401 - declared torch-free there, for --help
from glm_cli.core.tune.sft_data import IGNORE


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (B, T) from per-token rewards and values; mask marks real answer tokens.

    delta_t = r_t + gamma V_{t+1} - V_t (V past the answer's end is 0); A_t = delta_t + gamma lam A_{t+1}.
    """
    B, T = rewards.shape
    mask = mask.float()
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * next_mask
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


def ppo_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                  clip: float, value_clip: float, vf_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped PPO loss over masked answer tokens (all inputs (B, T)); metrics are detached."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    policy_loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), mask)
    v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value_loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    metrics = {
        "policy_loss": policy_loss.detach(),
        "value_loss": value_loss.detach(),
        "clip_frac": masked_mean((pg_clipped > pg_unclipped).float(), mask).detach(),
        "approx_kl": 0.5 * masked_mean((logp - old_logp).detach() ** 2, mask),
    }
    return policy_loss + vf_coef * value_loss, metrics


# ------------------------------------------------------------------------------------------- rollouts


def rollout_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded to Tp, answers right-padded to Tr, as one (B, Tp + Tr - 1) input.

    Returns input_ids, positions (counting real tokens only), valid (real-token flags of the inputs),
    targets (the answer tokens, IGNORE elsewhere) and answer_mask (B, Tr). Logits at columns
    Tp - 1 .. Tp + Tr - 2 predict the answer tokens; `start` = Tp - 1.
    """
    B = len(prompts)
    Tp, Tr = max(len(p) for p in prompts), max(len(a) for a in answers)
    full = torch.full((B, Tp + Tr), pad_id, dtype=torch.long)
    valid = torch.zeros((B, Tp + Tr), dtype=torch.bool)
    for b, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        full[b, Tp - len(p):Tp] = torch.tensor(p)
        full[b, Tp:Tp + len(a)] = torch.tensor(a)
        valid[b, Tp - len(p):Tp + len(a)] = True
    targets = full[:, 1:].clone()
    targets[:, :Tp - 1] = IGNORE
    targets[~valid[:, 1:]] = IGNORE
    inputs, in_valid = full[:, :-1], valid[:, :-1]
    positions = (in_valid.long().cumsum(1) - 1).clamp(min=0)
    return {"input_ids": inputs, "positions": positions, "valid": in_valid, "targets": targets,
            "answer_mask": valid[:, Tp:], "start": torch.tensor(Tp - 1)}


def rewards_with_kl(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, answer_mask: torch.Tensor,
                    kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, Tr): -kl_coef * (log pi - log ref), plus the score on each answer's last token.

    Returns (rewards, kl per token).
    """
    mask = answer_mask.float()
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (answer_mask.long().sum(1) - 1).clamp(min=0)
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    return rewards, kl
