"""Preference alignment as a recipe a script can run: `AlignOptions` and a loaded `TuneBase` in, a
`TuneRun` out. `ALIGN_METHODS` maps each method name to the function that builds its task, so a new
method is one entry here (and its Task in core/tune/align.py); `glm align --method` takes its choices
from this table.

    run = build_align(AlignOptions(method="dpo", data="prefs.jsonl", output="runs/dpo"), load_tuning_base("sft"))
    summary = run.summary(run.trainer().fit())
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from glm_cli.core.console import log
from glm_cli.core.errors import CheckpointError, DataError, OptionError
from glm_cli.core.field_docs import one_of
from glm_cli.core.io.corpus import read_records
from glm_cli.core.tokens.chat import prompt_messages
from glm_cli.core.tune.align import DPOTask, PPOTask, RewardModelScorer, RewardTask
from glm_cli.core.tune.defaults import ALIGN
from glm_cli.core.tune.holdout import validation_split
from glm_cli.core.tune.preference import ScalarHead, load_pairs, load_reward_model
from glm_cli.core.tune.settings import DPOConfig, PPOConfig
from glm_cli.core.tune.tune_setup import (
    TuneBase,
    TuneOptions,
    TuneRun,
    precision_note,
    prepare_model,
    run_config,
    steps_for,
)

DPO, PPO = DPOConfig(), PPOConfig()  # the defaults


@dataclass(kw_only=True, slots=True)
class AlignOptions(TuneOptions):
    """An alignment run: the shared settings, the method, and each method's own."""

    method: str = "dpo"
    """A key of ALIGN_METHODS (below)."""
    merge: bool = True
    epochs: float = 2.0
    reward_model: str | None = None
    """ppo: the reward model (the output of a reward run: RUN/final)."""
    # dpo: the DPOConfig fields, ppo: the PPOConfig fields of the same names (core/tune/settings.py,
    # documented there; `glm align` shows them as its help)
    beta: float = DPO.beta
    label_smoothing: float = DPO.label_smoothing
    loss_type: str = DPO.loss_type
    kl_coef: float = PPO.kl_coef
    rollout_size: int = PPO.rollout_size
    ppo_epochs: int = PPO.ppo_epochs
    clip: float = PPO.clip
    vf_coef: float = PPO.vf_coef
    max_new_tokens: int = PPO.max_new_tokens
    temperature: float = PPO.temperature


@dataclass(kw_only=True, slots=True)
class MethodTask:
    """What a method's builder returns: the task, how many items one epoch holds, and what to record."""

    task: object
    n_items: int
    info: dict


@dataclass(kw_only=True, slots=True)
class AlignMethod:
    """One alignment method: its options check (before the base is loaded) and its task builder, called
    with (options, base, model, length, common task arguments, seed)."""

    check: Callable[[AlignOptions], None]
    build: Callable[..., MethodTask]
    lr: dict[str, float]
    """The learning rate by PEFT method, unless the settings name one (alignment moves less than SFT)."""
    merges: bool = False
    """Its final checkpoint always holds the trained weights whole (no separate adapter)."""


def _check_pairs(options: AlignOptions) -> None:
    if options.loss_type not in ("sigmoid", "robust"):
        raise OptionError("{loss_type} {value!r}: choose sigmoid or robust", value=options.loss_type)


def _check_reward(options: AlignOptions) -> None:
    _check_pairs(options)
    if options.peft not in ("full", "lora"):
        raise OptionError("{method} reward: use {peft} full or lora (the reward model is saved as a plain "
                          "checkpoint and a value head, so the trained weights must fold into it)")


def _check_ppo(options: AlignOptions) -> None:
    _check_pairs(options)
    if not options.reward_model:
        raise OptionError("{method} ppo needs {reward_model} (train one with {method} reward)")


def _pairs(options: AlignOptions, base: TuneBase, length: int, seed: int):
    train_pairs, dropped = load_pairs(options.data, base.encoder, length)
    train_pairs, val_pairs = validation_split(
        train_pairs, options.val, lambda path: load_pairs(path, base.encoder, length)[0], options.val_fraction, seed)
    if dropped:
        log(f"{dropped} pair(s) dropped: an answer is longer than {length} tokens")
    log(f"align ({options.method}, {options.peft}): {len(train_pairs)} pairs, {len(val_pairs)} held out")
    return train_pairs, val_pairs


def _build_dpo(options, base, model, length, common, seed) -> MethodTask:
    train_pairs, val_pairs = _pairs(options, base, length, seed)
    task = DPOTask(model, train_pairs, val_pairs, beta=options.beta, label_smoothing=options.label_smoothing,
                   loss_type=options.loss_type, **common)
    return MethodTask(task=task, n_items=len(train_pairs),
                      info={"train_pairs": len(train_pairs), "val_pairs": len(val_pairs)})


def _build_reward(options, base, model, length, common, seed) -> MethodTask:
    train_pairs, val_pairs = _pairs(options, base, length, seed)
    if not model.config.tie_embeddings:  # the scalar head replaces the LM head: leave it out of training
        model.lm_head.weight.requires_grad_(False)
    task = RewardTask(ScalarHead(model), train_pairs, val_pairs, **common)
    return MethodTask(task=task, n_items=len(train_pairs),
                      info={"train_pairs": len(train_pairs), "val_pairs": len(val_pairs)})


def read_prompts(path: str, encoder, limit: int) -> list[list[int]]:
    """The prompt ids of a JSONL of {"prompt"} (or {"messages"}, its assistant turns left out), each
    cut to its last `limit` tokens."""
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


def _build_ppo(options, base, model, length, common, seed) -> MethodTask:
    encoder = base.encoder
    prompt_len = max(8, length - options.max_new_tokens)
    prompts, val_prompts = validation_split(
        read_prompts(options.data, encoder, prompt_len), options.val,
        lambda path: read_prompts(path, encoder, prompt_len), options.val_fraction, seed)
    rm = load_reward_model(options.reward_model)
    if rm.config.vocab_size != model.config.vocab_size:
        raise OptionError("{reward_model} {path}: vocabulary {rm} differs from the policy's {policy}; both must "
                          "use the same tokenizer", path=options.reward_model, rm=rm.config.vocab_size,
                          policy=model.config.vocab_size)
    cfg = PPOConfig(rollout_size=options.rollout_size, minibatch_size=common["micro_batch_size"],
                    ppo_epochs=options.ppo_epochs, max_new_tokens=options.max_new_tokens,
                    temperature=options.temperature, kl_coef=options.kl_coef, clip=options.clip,
                    vf_coef=options.vf_coef)
    if encoder.end_id is None:
        raise CheckpointError(f"{base.path}: the chat template ends an answer with no single end-of-turn token, "
                              "which PPO rollouts need to stop at")
    common = {k: v for k, v in common.items() if k != "micro_batch_size"}
    task = PPOTask(model, prompts, val_prompts, RewardModelScorer(rm, common["pad_id"]), config=cfg,
                   stop_id=encoder.end_id, **common)
    log(f"align (ppo, {options.peft}): {len(prompts)} prompts, {len(val_prompts)} held out, "
        f"rollouts of {options.rollout_size}")
    return MethodTask(task=task, n_items=len(prompts) * options.ppo_epochs,
                      info={"prompts": len(prompts), "val_prompts": len(val_prompts),
                            "reward_model": options.reward_model})


# name -> method. A new alignment method is a Task (core/tune/align.py) and an entry here.
ALIGN_METHODS: dict[str, AlignMethod] = {
    "dpo": AlignMethod(check=_check_pairs, build=_build_dpo,
                       lr={"full": 2e-5, "lora": 5e-4, "adapter": 5e-4, "prompt": 1e-2}),
    "reward": AlignMethod(check=_check_reward, build=_build_reward, merges=True,
                          lr={"full": 1e-4, "lora": 1e-3, "adapter": 1e-3, "prompt": 1e-2}),
    "ppo": AlignMethod(check=_check_ppo, build=_build_ppo,
                       lr={"full": 1e-5, "lora": 2e-4, "adapter": 2e-4, "prompt": 1e-2}),
}


def align_settings(options: AlignOptions):
    """The options checked before anything is loaded: (method, peft config, training settings, keys given)."""
    method = ALIGN_METHODS.get(options.method)
    if method is None:
        raise OptionError("{method} {value!r}: choose {choices}", value=options.method,
                          choices=one_of(list(ALIGN_METHODS)))
    method.check(options)
    peft = options.peft_config()
    settings, given = options.train_settings(ALIGN)
    return method, peft, settings, given


def build_align(options: AlignOptions, base: TuneBase, checked=None) -> TuneRun:
    """The alignment run of `options` on `base` (its reference model, for DPO and PPO, is the base with
    the adapters switched off, or a frozen copy under full training). `checked` is `align_settings(options)`
    when the caller already ran it."""
    method, peft, settings, given = checked or align_settings(options)
    merge = options.merge and options.peft == "lora"
    seed = settings.seed
    torch.manual_seed(seed)
    precision_note(settings)
    model = base.model
    length = options.seq_len or model.config.max_seq_len
    if peft is not None and peft.method == "prompt":
        length -= peft.prompt_tokens
    pid = base.pad_id()
    model = prepare_model(model, peft, None, merge)
    common = dict(pad_id=pid, micro_batch_size=settings.micro_batch_size, seed=seed, tokenizer_dir=base.path,
                  peft=peft, merge=merge, base=str(base.path))
    info = {"command": "align", "method": options.method, "peft": options.peft, "base": str(base.path),
            "data": options.data, "val": options.val}
    built = method.build(options, base, model, length, common, seed)
    info.update(built.info)
    steps = steps_for(built.n_items, settings.micro_batch_size, settings.grad_accum, options.epochs,
                      settings.max_steps)
    train_config = run_config(settings, given, steps=steps, default_lr=method.lr[options.peft])
    return TuneRun(task=built.task, config=train_config, output=options.output, resume=options.resume,
                   run_info={"title": f"align {options.method}", **info}, model=model, peft=peft,
                   merged=merge or method.merges, base=str(base.path),
                   summary_fields={"command": "align", "method": options.method, "peft": options.peft},
                   trained=built.task.model)
