"""Alignment: DPO, reward model and PPO math against hand computation, and short runs through the engine."""

import json
import math

import pytest
import torch

from glm_cli.core.model.config import preset
from glm_cli.core.model.transformer import Transformer
from glm_cli.core.tune.ppo import gae, ppo_objective, rewards_with_kl, rollout_batch
from glm_cli.core.tune.preference import (
    ScalarHead,
    collate_full,
    collate_sequences,
    dpo_loss,
    reward_loss,
    sequence_logps,
)


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
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
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


def test_rollout_batch_layout_and_kl_rewards():
    batch = rollout_batch([[7, 8, 9], [7]], [[10, 5], [11, 12, 5]], pad_id=1)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 10, 5], [1, 1, 7, 11, 12]]
    assert batch["positions"][1].tolist()[2:] == [0, 1, 2]
    start = int(batch["start"])
    assert batch["targets"][:, start:].tolist() == [[10, 5, -100], [11, 12, 5]]
    assert batch["answer_mask"].tolist() == [[True, True, False], [True, True, True]]
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -2.0, -0.5]])
    rewards, kl = rewards_with_kl(torch.tensor([3.0, -1.0]), logp, ref, batch["answer_mask"], kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.0, 1.0, -0.5]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1 + 3.0, 0.0], [0.0, -0.1, 0.05 - 1.0]]))


# ------------------------------------------------------------------------------------ through the engine

TARGET = 7


def toy_reward(prompts, answers):
    """Reward the share of answer tokens that are TARGET."""
    return torch.tensor([sum(t == TARGET for t in a) / len(a) for a in answers])


def _ppo_task(config, peft_cfg=None):
    from glm_cli.core.tune.align import PPOTask
    from glm_cli.core.tune.peft import apply_peft

    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=32, n_layers=1, dim=32, n_heads=2, n_kv_heads=1, pad_token_id=1))
    if peft_cfg is not None:
        model = apply_peft(model, peft_cfg)
    prompts = [[3, 10 + i % 8, 11, 4] for i in range(32)]
    return PPOTask(model.train(), prompts, prompts[:8], toy_reward, config=config, stop_id=5, pad_id=1, seed=0,
                   peft=peft_cfg)


def test_ppo_raises_a_toy_reward_with_bounded_kl(tmp_path):
    from glm_cli.core.train.trainer import TrainConfig, Trainer
    from glm_cli.core.tune.ppo import PPOConfig

    task = _ppo_task(PPOConfig(rollout_size=32, minibatch_size=16, ppo_epochs=2, max_new_tokens=8, kl_coef=0.05))
    before = task.evaluate(task.model)
    assert before["val_kl"] == pytest.approx(0.0, abs=1e-5)
    config = TrainConfig(lr=5e-3, max_steps=24, warmup_steps=0, schedule="constant", weight_decay=0.0,
                         eval_every=0, peak_flops=1.0, log_every=0)
    result = Trainer(task, config, tmp_path / "ppo").fit()
    after = result.metrics
    assert after["val_reward"] > before["val_reward"] + 0.08, (before, after)
    assert 0.0 < after["val_kl"] < 5.0  # nats per answer: it moved, but stayed near the reference
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "clip_frac" in r]
    assert {"reward", "kl", "clip_frac", "approx_kl", "value_loss"} <= set(train[-1])
    assert train[-1]["reward"] > train[0]["reward"]


def test_ppo_resumes_exactly_mid_rollout(tmp_path):
    from glm_cli.core.checkpoint.directory import load_tensors
    from glm_cli.core.train.trainer import TrainConfig, Trainer
    from glm_cli.core.tune.peft import PeftConfig
    from glm_cli.core.tune.ppo import PPOConfig

    ppo = PPOConfig(rollout_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=6)  # 4 steps a rollout
    lora = PeftConfig(method="lora", rank=2, targets=["all-linear"])
    config = TrainConfig(lr=1e-2, max_steps=6, warmup_steps=0, checkpoint_every=3, eval_every=0,
                         peak_flops=1.0, log_every=0)
    a = Trainer(_ppo_task(ppo, lora), config, tmp_path / "a").fit()
    b = Trainer(_ppo_task(ppo, lora), config, tmp_path / "b",
                resume=tmp_path / "a" / "checkpoints" / "step-000003").fit()
    ta, tb = load_tensors(a.final_dir / "adapter.safetensors"), load_tensors(b.final_dir / "adapter.safetensors")
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert a.metrics == b.metrics


def test_dpo_run_improves_preference_accuracy_and_resumes(tmp_path):
    from tuning_fixtures import make_base

    from glm_cli.core.checkpoint.directory import load_tensors
    from glm_cli.core.load import load_model
    from glm_cli.core.tokens.chat import ChatEncoder
    from glm_cli.core.tokens.tokenizer import load_tokenizer
    from glm_cli.core.train.trainer import TrainConfig, Trainer
    from glm_cli.core.tune.align import DPOTask
    from glm_cli.core.tune.peft import PeftConfig, apply_peft
    from glm_cli.core.tune.preference import load_pairs

    base = make_base(tmp_path / "data")
    encoder = ChatEncoder(load_tokenizer(base))
    prefs = tmp_path / "prefs.jsonl"  # one answer is always preferred: learnable in a few steps
    prefs.write_text("".join(json.dumps({"prompt": f"Who speaks? {i}", "chosen": "Hamlet", "rejected": "Othello"})
                             + "\n" for i in range(16)))
    pairs, _ = load_pairs(str(prefs), encoder, 64)

    def task():
        torch.manual_seed(0)
        model = apply_peft(load_model(base), PeftConfig(method="lora", rank=4, targets=["all-linear"])).train()
        return DPOTask(model, pairs, pairs[:8], beta=0.5, pad_id=1, micro_batch_size=4, seed=0,
                       tokenizer_dir=base, peft=PeftConfig(method="lora", rank=4, targets=["all-linear"]),
                       merge=True, base=str(base))

    config = TrainConfig(lr=1e-2, max_steps=8, warmup_steps=0, checkpoint_every=4, eval_every=0,
                         peak_flops=1.0, log_every=0)
    first = task()
    before = first.evaluate(first.model)
    assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the start
    a = Trainer(first, config, tmp_path / "a").fit()
    assert a.metrics["val_loss"] < before["val_loss"] - 0.1 and a.metrics["val_reward_accuracy"] >= 0.75
    b = Trainer(task(), config, tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step-000004").fit()
    wa, wb = load_tensors(a.final_dir / "model.safetensors"), load_tensors(b.final_dir / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ------------------------------------------------------------------- packed batches (segment attention)


def _pairs():
    from glm_cli.core.tune.preference import Pair

    return [Pair([7, 8, 9], [10, 11], [12]), Pair([7, 8], [12, 13, 14], [10, 11, 9, 9]),
            Pair([5, 6, 7, 8, 9, 10], [11], [13, 14])]


def test_packed_pair_batch_equals_padded_rows_in_logps_and_gradients():
    """Chosen and rejected end to end in one row with segment attention: the same sequence log-probs
    and gradients as the padded (2B, T) rows with their mask."""
    from glm_cli.core.tune.preference import packed_pair_batch, pair_batch

    torch.manual_seed(0)
    model = Transformer(preset("tiny", n_kv_heads=2))
    packed = packed_pair_batch(_pairs())
    assert packed["input_ids"].shape[0] == 1 and packed["last"].tolist()[-1] == packed["input_ids"].shape[1] - 1
    results = []
    for batch in (packed, pair_batch(_pairs(), pad_id=1)):
        model.zero_grad()
        logps = sequence_logps(model, batch)
        (logps * torch.arange(1.0, 7.0)).sum().backward()  # weighs every sequence differently
        results.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_packed_reward_scores_equal_padded_rows():
    from glm_cli.core.model.segments import Segments
    from glm_cli.core.tune.preference import packed_full

    torch.manual_seed(0)
    rm = ScalarHead(Transformer(preset("tiny")), init_std=0.1).eval()
    seqs = [[7, 8, 9, 10], [7, 8], [9] * 20]
    padded = collate_full(seqs, pad_id=1)
    packed = packed_full(seqs)
    with torch.no_grad():
        want = rm.score(padded["input_ids"], padded["last"], padded["mask"])
        got = rm.score(packed["input_ids"], packed["last"], positions=packed["positions"],
                       segments=Segments.from_ids(packed["segments"]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ppo_rollout_rows_attend_without_a_mask():
    """PolicyValue on left- and right-padded rollout rows: segment attention equals the padding mask on
    every real answer position."""
    from glm_cli.core.tune.align import PolicyValue
    from glm_cli.core.tune.preference import padding_mask

    torch.manual_seed(0)
    pv = PolicyValue(Transformer(preset("tiny"))).eval()
    torch.nn.init.normal_(pv.value_head.weight, 0, 0.1)
    batch = rollout_batch([[7, 8, 9], [7], [5, 6, 7, 8]], [[10, 5], [11, 12, 5], [9]], pad_id=1)
    start = int(batch["start"])
    with torch.no_grad():
        logits, values = pv(batch["input_ids"], batch["positions"], batch["valid"], start)
        h = pv.policy.hidden_states(pv.policy.embed(batch["input_ids"]), batch["positions"],
                                    padding_mask(batch["valid"]))[:, start:]
    real = batch["answer_mask"]
    torch.testing.assert_close(logits[real], pv.policy.lm_head(h)[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values[real], pv.value_head(h).squeeze(-1)[real], rtol=1e-5, atol=1e-5)
