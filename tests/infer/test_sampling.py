"""Each logit processor against its definition, on hand-made logits; seeded draws match the distribution."""

import math

import pytest
import torch

from glm_cli.core.errors import UsageError
from glm_cli.core.infer.sampling import (
    LogitsPipeline,
    SamplingConfig,
    add_logit_bias,
    apply_temperature,
    contrastive_scores,
    frequency_presence_penalty,
    min_p_filter,
    repetition_penalty,
    select,
    top_k_filter,
    top_p_filter,
)

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_temperature_divides_logits_and_zero_is_greedy():
    assert torch.allclose(apply_temperature(LOGITS, 2.0), LOGITS / 2)
    assert torch.equal(apply_temperature(LOGITS, 0.0), LOGITS)
    pipeline = LogitsPipeline(SamplingConfig(temperature=0.0, top_k=1, top_p=0.1), 4, "cpu")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4, generator=g)
    assert torch.equal(pipeline.next_tokens(logits, g), logits.argmax(-1))


def test_top_k_keeps_the_k_highest():
    assert kept(top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)) == [1, 2]
    assert kept(top_k_filter(LOGITS, 0)) == [0, 1, 2, 3]


@pytest.mark.parametrize("p, expected", [(0.4, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3]),
                                         (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(p, expected):
    # permute so the filter cannot rely on the input already being sorted
    perm = torch.tensor([2, 0, 3, 1])
    out = top_p_filter(LOGITS[:, perm], p)
    assert sorted(perm[kept(out)].tolist()) == expected


def test_min_p_keeps_tokens_above_a_fraction_of_the_top():
    assert kept(min_p_filter(LOGITS, 0.5)) == [0, 1]  # threshold 0.25
    assert kept(min_p_filter(LOGITS, 0.2)) == [0, 1, 2]  # threshold 0.1
    assert kept(min_p_filter(LOGITS, 0.09)) == [0, 1, 2, 3]  # threshold 0.045


def test_repetition_penalty_is_ctrl_style():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert torch.allclose(repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -4.0, 1.0]]))


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.zeros(1, 3)
    counts = torch.tensor([[0.0, 1.0, 3.0]])
    out = frequency_presence_penalty(logits, counts, frequency=0.5, presence=1.0)
    assert torch.allclose(out, torch.tensor([[0.0, -1.5, -2.5]]))


def test_logit_bias_adds_and_can_ban():
    bias = torch.tensor([0.0, -100.0, 0.0, 5.0])
    assert torch.allclose(add_logit_bias(LOGITS, bias), LOGITS + bias)
    pipeline = LogitsPipeline(SamplingConfig(logit_bias={0: -100.0}), 4, "cpu")
    assert pipeline.next_tokens(LOGITS).item() == 1


def test_pipeline_counts_generated_tokens_and_sees_the_prompt():
    pipeline = LogitsPipeline(SamplingConfig(repetition_penalty=2.0, frequency_penalty=1.0), 4, "cpu")
    prompt = torch.tensor([[2, 2, 1]])
    pipeline.start(prompt, torch.tensor([[False, True, True]]))
    pipeline.observe(torch.tensor([3]))
    pipeline.observe(torch.tensor([3]))
    out = pipeline(torch.ones(1, 4))
    # token 1, 2 in the prompt: 1 / 2; token 3 generated twice: 1 / 2 (seen) - 2 (frequency)
    assert torch.allclose(out, torch.tensor([[1.0, 0.5, 0.5, -1.5]]))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampling_frequencies_match_the_distribution():
    n = 20000
    logits = LOGITS.expand(n, 4)
    draws = select(logits, greedy=False, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=4).float()
    assert chi_square(counts, PROBS[0]) < 16.27  # chi-square, 3 degrees of freedom, p = 0.001


def test_sampling_after_top_k_and_temperature_matches_the_renormalized_distribution():
    n = 20000
    pipeline = LogitsPipeline(SamplingConfig(temperature=0.5, top_k=3), 4, "cpu")
    draws = pipeline.next_tokens(LOGITS.expand(n, 4), torch.Generator().manual_seed(2))
    counts = torch.bincount(draws, minlength=4).float()
    assert counts[3] == 0
    target = (PROBS[0, :3] ** 2) / (PROBS[0, :3] ** 2).sum()  # softmax(log p / 0.5) = p^2 renormalized
    assert chi_square(counts[:3], target) < 13.82  # 2 degrees of freedom, p = 0.001


def test_seeded_draws_are_reproducible():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    a = select(logits, False, torch.Generator().manual_seed(7))
    b = select(logits, False, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_contrastive_scores_follow_li_et_al():
    expert = torch.tensor([[0.6, 0.3, 0.1]]).log()
    amateur = torch.tensor([[0.7, 0.1, 0.2]]).log()
    scores = contrastive_scores(expert, amateur, alpha=0.4)  # plausible: p >= 0.24 -> tokens 0, 1
    assert kept(scores) == [0, 1]
    assert math.isclose(scores[0, 0].item(), math.log(0.6 / 0.7), rel_tol=1e-5)
    assert math.isclose(scores[0, 1].item(), math.log(0.3 / 0.1), rel_tol=1e-5)
    assert scores.argmax().item() == 1  # the expert's second choice, which the amateur underrates


def test_invalid_settings_are_usage_errors():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(min_p=2.0), dict(repetition_penalty=0.0)):
        with pytest.raises(UsageError):
            SamplingConfig(**bad).validate()
    with pytest.raises(UsageError):
        LogitsPipeline(SamplingConfig(logit_bias={99: 1.0}), 4, "cpu")
