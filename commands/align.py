"""`glm align`: preference alignment with DPO, a reward model, or PPO against a reward model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glm_cli.commands import _tuning as T
from glm_cli.commands._common import (
    JsonSummary,
    Quiet,
    TrainConfigFile,
    TrainDevice,
    TrainDtype,
    TrainSeed,
    TrainSet,
    emit_summary,
    given_flags,
)

ALIGN_LR = {"dpo": {"full": 2e-5, "lora": 5e-4, "adapter": 5e-4, "prompt": 1e-2},
            "reward": {"full": 1e-4, "lora": 1e-3, "adapter": 1e-3, "prompt": 1e-2},
            "ppo": {"full": 1e-5, "lora": 2e-4, "adapter": 2e-4, "prompt": 1e-2}}


def _prompts(path: str, encoder, limit: int) -> list[list[int]]:
    from glm_cli.core.errors import DataError
    from glm_cli.core.io.corpus import read_records
    from glm_cli.core.tokens.chat import prompt_messages

    out = []
    for number, record in enumerate(read_records(path), start=1):
        if isinstance(record.get("prompt"), str):
            messages = prompt_messages(record["prompt"], record.get("system"))
        elif isinstance(record.get("messages"), list):
            messages = [m for m in record["messages"] if m.get("role") != "assistant"] or record["messages"]
        else:
            raise DataError(path, number, "expected a \"prompt\" string (or \"messages\")")
        ids = encoder.prompt_ids(messages)
        out.append(ids[-limit:])
    if not out:
        raise DataError(path, 0, "no prompts")
    return out


def command(
    ctx: typer.Context,
    base: Annotated[str, typer.Argument(help="Checkpoint to align (usually the output of `glm finetune`: "
                                         "RUN/final).  Examples:  glm align runs/sft/final --data prefs.jsonl -o "
                                         "runs/dpo  |  glm align runs/sft/final --method reward --data prefs.jsonl "
                                         "-o runs/rm  |  glm align runs/sft/final --method ppo --reward-model "
                                         "runs/rm/final --data prompts.jsonl -o runs/ppo")],
    data: Annotated[str, typer.Option("--data", "-d", help="Training JSONL. dpo and reward: {\"prompt\", "
                                      "\"chosen\", \"rejected\"}; ppo: {\"prompt\"} (preference files work too).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Run directory; RUN/final is the aligned model "
                                        "(for --method reward: the reward model).")],
    method: Annotated[str, typer.Option("--method", help="dpo | reward | ppo.")] = "dpo",
    val: Annotated[str | None, typer.Option("--val", help="Held-out JSONL (same format): DPO reward accuracy, "
                                            "reward-model pairwise accuracy, PPO reward on its prompts. Default: "
                                            "--val-fraction of --data.")] = None,
    val_fraction: T.ValFraction = 0.05,
    reward_model: Annotated[str | None, typer.Option("--reward-model", help="ppo: the reward model (output "
                                                     "of --method reward: RUN/final).")] = None,
    beta: Annotated[float, typer.Option("--beta", min=0, help="dpo: strength of the implicit KL constraint.")] = 0.1,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", min=0, max=0.49, help="dpo: assumed "
                                                   "share of flipped preference labels (cDPO / robust).")] = 0.0,
    loss_type: Annotated[str, typer.Option("--loss-type", help="dpo: sigmoid (cDPO with label smoothing) or "
                                           "robust (Chowdhury et al.).")] = "sigmoid",
    kl_coef: Annotated[float, typer.Option("--kl-coef", min=0, help="ppo: per-token KL penalty to the "
                                           "reference model.")] = 0.05,
    rollout_size: Annotated[int, typer.Option("--rollout-size", min=1, help="ppo: prompts per rollout.")] = 16,
    ppo_epochs: Annotated[int, typer.Option("--ppo-epochs", min=1, help="ppo: passes over each rollout.")] = 2,
    clip: Annotated[float, typer.Option("--clip", min=0, help="ppo: policy ratio clip epsilon.")] = 0.2,
    vf_coef: Annotated[float, typer.Option("--vf-coef", min=0, help="ppo: value loss weight.")] = 0.1,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="ppo: longest sampled answer.")] = 24,
    temperature: Annotated[float, typer.Option("--temperature", min=0.05, help="ppo: sampling temperature.")] = 1.0,
    peft_method: T.Peft = "lora",
    lora_rank: T.LoraRank = 8,
    lora_alpha: T.LoraAlpha = 16.0,
    lora_dropout: T.LoraDropout = 0.0,
    lora_targets: T.LoraTargets = "q_proj,v_proj",
    adapter_dim: T.AdapterDim = 16,
    prompt_tokens: T.PromptTokens = 16,
    merge: T.Merge = True,
    epochs: T.Epochs = 2.0,
    max_steps: T.MaxSteps = T.ALIGN.max_steps,
    seq_len: T.SeqLen = 0,
    micro_batch_size: T.MicroBatch = T.ALIGN.micro_batch_size,
    grad_accum: T.GradAccum = T.ALIGN.grad_accum,
    lr: T.Lr = None,
    warmup_steps: T.Warmup = T.ALIGN.warmup_steps,
    eval_every: T.EvalEvery = T.ALIGN.eval_every,
    resume: T.Resume = False,
    device: TrainDevice = T.ALIGN.device,
    dtype: TrainDtype = T.ALIGN.dtype,
    activation_checkpointing: T.ActivationCheckpointing = False,
    config: TrainConfigFile = None,
    set_: TrainSet = None,
    seed: TrainSeed = T.ALIGN.seed,
    as_json: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Align a model to preferences: DPO (default), a Bradley-Terry reward model, or PPO (RLHF).

    --peft selects the trained parameters (default lora, merged at the end); the reference model of DPO
    and PPO is then the base with its adapters switched off. Training settings: the defaults shown,
    --config FILE.json, --set KEY=VALUE (any field of core.train.settings.TrainConfig), then the options
    typed, as in glm pretrain and glm finetune.

    Examples:

        glm align runs/sft/final --data tasks/prefs.jsonl --val tasks/prefs_val.jsonl -o runs/dpo
        glm align runs/sft/final --method reward --data tasks/prefs.jsonl -o runs/rm
        glm align runs/sft/final --method ppo --reward-model runs/rm/final --data tasks/prompts.jsonl -o runs/ppo
    """
    import torch

    from glm_cli.core.console import log, set_quiet
    from glm_cli.core.errors import UsageError
    from glm_cli.core.train.trainer import Trainer
    from glm_cli.core.tune.holdout import validation_split

    set_quiet(quiet)
    if method not in ("dpo", "reward", "ppo"):
        raise UsageError(f"--method {method!r}: choose dpo, reward or ppo")
    if loss_type not in ("sigmoid", "robust"):
        raise UsageError(f"--loss-type {loss_type!r}: choose sigmoid or robust")
    if method == "ppo" and not reward_model:
        raise UsageError("--method ppo needs --reward-model (train one with --method reward)")
    if method == "reward" and peft_method not in ("full", "lora"):
        raise UsageError("--method reward: use --peft full or lora (the reward model is saved as a plain "
                         "checkpoint and a value head, so the trained weights must fold into it)")
    peft = T.peft_config(peft_method, lora_rank, lora_alpha, lora_dropout, lora_targets, adapter_dim, prompt_tokens)
    merge = merge and peft_method == "lora"
    settings, given = T.train_settings(T.ALIGN, config, set_, given_flags(ctx, {
        "max_steps": max_steps, "micro_batch_size": micro_batch_size, "grad_accum": grad_accum, "lr": lr,
        "warmup_steps": warmup_steps, "eval_every": eval_every, "device": device, "dtype": dtype, "seed": seed,
        "activation_checkpointing": activation_checkpointing}))
    seed, micro_batch_size = settings.seed, settings.micro_batch_size
    torch.manual_seed(seed)
    T.precision_note(settings)
    model, tokenizer, encoder = T.load_base_and_tokenizer(base)
    length = seq_len or model.config.max_seq_len
    if peft is not None and peft.method == "prompt":
        length -= peft.prompt_tokens
    pid = T.pad_id(model, tokenizer)
    model = T.prepare_model(model, peft, None, merge)
    common = dict(pad_id=pid, micro_batch_size=micro_batch_size, seed=seed, tokenizer_dir=base, peft=peft,
                  merge=merge, base=str(base))
    info = {"command": "align", "method": method, "peft": peft_method, "base": str(base), "data": data, "val": val}

    if method in ("dpo", "reward"):
        from glm_cli.core.tune.align import DPOTask, RewardTask
        from glm_cli.core.tune.preference import ScalarHead, load_pairs

        train_pairs, dropped = load_pairs(data, encoder, length)
        train_pairs, val_pairs = validation_split(
            train_pairs, val, lambda path: load_pairs(path, encoder, length)[0], val_fraction, seed)
        if dropped:
            log(f"{dropped} pair(s) dropped: an answer is longer than {length} tokens")
        n_items = len(train_pairs)
        if method == "dpo":
            task = DPOTask(model, train_pairs, val_pairs, beta=beta, label_smoothing=label_smoothing,
                           loss_type=loss_type, **common)
        else:
            if not model.config.tie_embeddings:  # the scalar head replaces the LM head: leave it out of training
                model.lm_head.weight.requires_grad_(False)
            task = RewardTask(ScalarHead(model), train_pairs, val_pairs, **common)
        info.update(train_pairs=len(train_pairs), val_pairs=len(val_pairs))
        log(f"align ({method}, {peft_method}): {len(train_pairs)} pairs, {len(val_pairs)} held out")
    else:
        from glm_cli.core.tune.align import PPOTask, RewardModelScorer
        from glm_cli.core.tune.ppo import PPOConfig
        from glm_cli.core.tune.preference import load_reward_model

        prompt_len = max(8, length - max_new_tokens)
        prompts, val_prompts = validation_split(
            _prompts(data, encoder, prompt_len), val, lambda path: _prompts(path, encoder, prompt_len),
            val_fraction, seed)
        rm = load_reward_model(reward_model)
        if rm.config.vocab_size != model.config.vocab_size:
            raise UsageError(f"--reward-model {reward_model}: vocabulary {rm.config.vocab_size} differs from the "
                             f"policy's {model.config.vocab_size}; both must use the same tokenizer")
        cfg = PPOConfig(rollout_size=rollout_size, minibatch_size=micro_batch_size, ppo_epochs=ppo_epochs,
                        max_new_tokens=max_new_tokens, temperature=temperature, kl_coef=kl_coef, clip=clip,
                        vf_coef=vf_coef)
        if encoder.end_id is None:
            from glm_cli.core.errors import CheckpointError

            raise CheckpointError(f"{base}: the chat template ends an answer with no single end-of-turn token, "
                             "which PPO rollouts need to stop at")
        common.pop("micro_batch_size")
        task = PPOTask(model, prompts, val_prompts, RewardModelScorer(rm, pid), config=cfg,
                       stop_id=encoder.end_id, **common)
        n_items = len(prompts) * ppo_epochs
        info.update(prompts=len(prompts), val_prompts=len(val_prompts), reward_model=reward_model)
        log(f"align (ppo, {peft_method}): {len(prompts)} prompts, {len(val_prompts)} held out, "
            f"rollouts of {rollout_size}")

    steps = T.steps_for(n_items, micro_batch_size, settings.grad_accum, epochs, settings.max_steps)
    train_config = T.run_config(settings, given, steps=steps, default_lr=ALIGN_LR[method][peft_method])
    result = Trainer(task, train_config, output, resume=resume, run_info={"title": f"align {method}", **info}).fit()
    summary = T.finish(result, Path(output), model, peft, merge or method == "reward", base,
                       {"command": "align", "method": method, "peft": peft_method}, trained=task.model)
    emit_summary(summary, as_json, data_on_stdout=False)
