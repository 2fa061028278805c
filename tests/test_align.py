"""Alignment: DPO, reward model and PPO math against hand computation, and short runs through the engine."""

import math

import pytest
import torch

from glm_cli.core.config import preset
from glm_cli.core.model import Transformer
from glm_cli.core.ppo import answer_mask, gae, ppo_objective, sample
from glm_cli.core.preference import (ScalarHead, collate_full, collate_sequences, dpo_loss, reward_loss,
                                     sequence_logps)


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_dpo_loss_matches_formula_on_hand_made_logps():
    pc, pr = torch.tensor([-5.0, -9.0]), torch.tensor([-7.0, -6.0])
    rc, rr = torch.tensor([-6.0, -8.0]), torch.tensor([-6.5, -7.0])
    beta, eps = 0.5, 0.1
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    z = [beta * ((-5 + 6) - (-7 + 6.5)), beta * ((-9 + 8) - (-6 + 7))]  # 0.75, -1.0
    expected = sum(-(1 - eps) * logsig(x) - eps * logsig(-x) for x in z) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["reward_accuracy"].item() == 0.5
    assert m["reward_margin"].item() == pytest.approx(sum(z) / 2)
    assert m["reward_chosen"].item() == pytest.approx((beta * 1 + beta * -1) / 2)
    robust, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, loss_type="robust")
    expected_r = sum((-(1 - eps) * logsig(x) + eps * logsig(-x)) / (1 - 2 * eps) for x in z) / 2
    assert robust.item() == pytest.approx(expected_r, rel=1e-6)
    plain, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert plain.item() == pytest.approx(sum(-logsig(x) for x in z) / 2, rel=1e-6)


def test_sequence_logps_count_only_response_tokens():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    prompts, responses = [[7, 8, 9], [7, 8]], [[10, 11], [12, 13, 14]]
    batch = collate_sequences(prompts, responses, pad_id=1)
    got = sequence_logps(model, batch)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([p + r])
        logp = torch.log_softmax(model(seq[:, :-1]), -1)[0]
        expected = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r))
        assert got[b].item() == pytest.approx(expected, abs=1e-4)


def test_reward_loss_and_scores_at_last_token():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.5, 1.0])
    loss, m = reward_loss(chosen, rejected)
    expected = -(logsig(1.0) + logsig(-0.5) + logsig(0.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["accuracy"].item() == pytest.approx(1 / 3)
    torch.manual_seed(0)
    rm = ScalarHead(Transformer(preset("tiny")), init_std=0.1).eval()
    seqs = [[7, 8, 9, 10], [7, 8]]
    batch = collate_full(seqs, pad_id=1)
    scores = rm.score(batch["input_ids"], batch["last"], batch["mask"])
    for b, s in enumerate(seqs):  # right padding does not change a row's score
        alone = rm.values(torch.tensor([s]))[0, -1]
        assert scores[b].item() == pytest.approx(alone.item(), abs=1e-5)


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.9]])
    mask = torch.tensor([[1, 1, 1, 0]])
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.3  # the last real step: no value after it
    d1 = -0.2 + g * 0.3 - 0.4
    d0 = 0.1 + g * 0.4 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = gae(rewards, values, mask, g, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]]))


def test_clipped_ppo_objective_matches_hand_computation():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.7, 0.3, 0.55]]))  # ratios 1.4, 0.6, 1.1
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    values = torch.tensor([[0.0, 1.0, 2.0]])
    old_values = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1]])
    loss, m = ppo_objective(new, old, adv, values, old_values, returns, mask, clip=0.2, value_clip=0.2, vf_coef=0.5)
    # policy terms max(-A r, -A clip(r)): 1.4 -> clip 1.2: max(-1.4, -1.2) = -1.2 (clipped)
    # 0.6 -> 0.8: max(1.2, 1.6) = 1.6 (clipped); 1.1 inside: -0.55
    pg = (-1.2 + 1.6 - 0.55) / 3
    # values clipped to old +- 0.2: 0.3, 0.7, 0.7 -> max((v-R)^2, (vc-R)^2)
    vf = 0.5 * (max(1.0, 0.49) + max(0.0, 0.09) + max(1.0, 0.09)) / 3
    assert m["policy_loss"].item() == pytest.approx(pg, rel=1e-5)
    assert m["value_loss"].item() == pytest.approx(vf, rel=1e-5)
    assert loss.item() == pytest.approx(pg + 0.5 * vf, rel=1e-5)
    assert m["clip_frac"].item() == pytest.approx(2 / 3)


def test_sampling_stops_and_masks():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    g = torch.Generator().manual_seed(0)
    prompts, answers = sample(model, [[7, 8, 9], [7]], 6, stop_id=5, pad_id=1, generator=g)
    assert prompts.shape == (2, 3) and prompts[1, 0] == 1 and answers.shape[0] == 2
    mask = answer_mask(torch.tensor([[3, 5, 1, 1], [3, 4, 4, 4]]), 5)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
