"""`glm align`: preference alignment with DPO, a reward model, or PPO against a reward model."""

from __future__ import annotations

from functools import partial
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
    flags_for_fields,
)

# the help of an option that sets a DPOConfig / PPOConfig field, marked as that method's
_dpo = partial(T.doc, "DPOConfig", prefix="dpo:")
_ppo = partial(T.doc, "PPOConfig", prefix="ppo:")


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
    method: Annotated[str, typer.Option("--method", help=T.ALIGN_METHOD_HELP)] = "dpo",
    val: Annotated[str | None, typer.Option("--val", help="Held-out JSONL (same format): DPO reward accuracy, "
                                            "reward-model pairwise accuracy, PPO reward on its prompts. Default: "
                                            "--val-fraction of --data.")] = None,
    val_fraction: T.ValFraction = 0.05,
    reward_model: Annotated[str | None, typer.Option("--reward-model", help=T.doc("AlignOptions",
                                                                                  "reward_model"))] = None,
    beta: Annotated[float, typer.Option("--beta", min=0, help=_dpo("beta"))] = T.DPO.beta,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", min=0, max=0.49,
                                                   help=_dpo("label_smoothing"))] = T.DPO.label_smoothing,
    loss_type: Annotated[str, typer.Option("--loss-type", help=_dpo("loss_type"))] = T.DPO.loss_type,
    kl_coef: Annotated[float, typer.Option("--kl-coef", min=0, help=_ppo("kl_coef"))] = T.PPO.kl_coef,
    rollout_size: Annotated[int, typer.Option("--rollout-size", min=1,
                                              help=_ppo("rollout_size"))] = T.PPO.rollout_size,
    ppo_epochs: Annotated[int, typer.Option("--ppo-epochs", min=1, help=_ppo("ppo_epochs"))] = T.PPO.ppo_epochs,
    clip: Annotated[float, typer.Option("--clip", min=0, help=_ppo("clip"))] = T.PPO.clip,
    vf_coef: Annotated[float, typer.Option("--vf-coef", min=0, help=_ppo("vf_coef"))] = T.PPO.vf_coef,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1,
                                                help=_ppo("max_new_tokens"))] = T.PPO.max_new_tokens,
    temperature: Annotated[float, typer.Option("--temperature", min=0.05,
                                               help=_ppo("temperature"))] = T.PPO.temperature,
    peft_method: T.Peft = "lora",
    lora_rank: T.LoraRank = T.PEFT.rank,
    lora_alpha: T.LoraAlpha = T.PEFT.alpha,
    lora_dropout: T.LoraDropout = T.PEFT.dropout,
    lora_targets: T.LoraTargets = T.LORA_TARGETS,
    adapter_dim: T.AdapterDim = T.PEFT.adapter_dim,
    prompt_tokens: T.PromptTokens = T.PEFT.prompt_tokens,
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
    from glm_cli.core.console import set_quiet
    from glm_cli.core.load.tuning_base import load_tuning_base
    from glm_cli.core.tune.align_setup import AlignOptions, align_settings, build_align

    set_quiet(quiet)
    options = AlignOptions(
        method=method, data=data, output=output, val=val, val_fraction=val_fraction, reward_model=reward_model,
        beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, kl_coef=kl_coef, rollout_size=rollout_size,
        ppo_epochs=ppo_epochs, clip=clip, vf_coef=vf_coef, max_new_tokens=max_new_tokens, temperature=temperature,
        peft=peft_method, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_targets=lora_targets, adapter_dim=adapter_dim, prompt_tokens=prompt_tokens, merge=merge,
        epochs=epochs, seq_len=seq_len, resume=resume, config_file=config, sets=list(set_ or []),
        settings=T.typed_settings(ctx))
    with flags_for_fields():
        checked = align_settings(options)  # before the base is loaded: a wrong setting fails at once
        run = build_align(options, load_tuning_base(base), checked)
    emit_summary(run.summary(run.trainer().fit()), as_json, data_on_stdout=False)
