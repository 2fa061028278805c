"""Supervised fine-tuning as a recipe a script can run: `FinetuneOptions` and a loaded `TuneBase` in, a
`TuneRun` out (the SFT task and its settings for the shared Trainer). `glm finetune` parses its flags into
these options and reports the summary; nothing of the recipe lives in the command.

    run = build_finetune(FinetuneOptions(data="qa.jsonl", output="runs/sft"), load_tuning_base("ckpt"))
    summary = run.summary(run.trainer().fit())
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from glm_cli.core.console import log
from glm_cli.core.errors import OptionError
from glm_cli.core.tune.defaults import DEFAULT_LR, FINETUNE
from glm_cli.core.tune.holdout import validation_split
from glm_cli.core.tune.peft import trainable_parameters
from glm_cli.core.tune.sft import SFTTask
from glm_cli.core.tune.sft_data import default_row_length, load_examples, pack, shuffled
from glm_cli.core.tune.tune_setup import (
    TuneBase,
    TuneOptions,
    TuneRun,
    options_dict,
    precision_note,
    prepare_model,
    run_config,
    steps_for,
)


@dataclass(kw_only=True, slots=True)
class FinetuneOptions(TuneOptions):
    """What a fine-tuning run takes beyond the shared settings (data: one chat or prompt/response per line)."""

    packing: bool = True
    """Pack short examples into full rows (attention and positions stay within each example)."""


EXAMPLES_PER_STEP = 8


def rows_per_step(n_examples: int, n_rows: int) -> int:
    """The default micro-batch of packed rows: as many rows as hold about EXAMPLES_PER_STEP examples.

    Why not a fixed number of rows: packing puts several short examples in a row, so 8 packed rows would
    be a step of 16 or 30 examples, and a run over the same examples would take a half or a quarter of
    the optimizer steps of an unpacked batch of 8 (as PEFT and TRL's padded trainers take by default):
    faster per token, but worse held-out loss after the same examples (measured in docs/finetune_align.md).
    Counting the default in examples keeps the step count of an unpacked batch and packing's speed."""
    per_row = max(1.0, n_examples / max(1, n_rows))
    return max(1, min(EXAMPLES_PER_STEP, round(EXAMPLES_PER_STEP / per_row)))


def finetune_settings(options: FinetuneOptions):
    """The options checked before anything is loaded: (peft config, training settings, keys given)."""
    peft = options.peft_config()
    if options.merge and options.peft != "lora":
        raise OptionError("{merge} applies to {peft} lora only ({method} adapters add layers or inputs and "
                          "cannot be folded into the weights)", method=options.peft)
    settings, given = options.train_settings(FINETUNE)
    return peft, settings, given


def build_finetune(options: FinetuneOptions, base: TuneBase, checked=None) -> TuneRun:
    """The fine-tuning run of `options` on `base`: examples read and packed into rows, PEFT applied,
    steps counted. `checked` is `finetune_settings(options)` when the caller already ran it."""
    peft, settings, given = checked or finetune_settings(options)
    seed = settings.seed
    torch.manual_seed(seed)
    precision_note(settings)
    model, encoder = base.model, base.encoder
    context = model.config.max_seq_len
    if options.seq_len > context:
        raise OptionError("{seq_len} {value} exceeds the model's context {context}", value=options.seq_len,
                          context=context)
    prompt_tokens = peft.prompt_tokens if peft is not None and peft.method == "prompt" else 0
    packing = options.packing and not prompt_tokens  # one soft prompt per row: each row holds one example

    def load(length: int):
        examples, dropped = load_examples(options.data, encoder, length)
        examples, val_examples = validation_split(
            examples, options.val, lambda path: load_examples(path, encoder, length)[0], options.val_fraction, seed)
        return examples, val_examples, dropped

    length = (options.seq_len or context) - prompt_tokens
    train_examples, val_examples, dropped = load(length)
    if not options.seq_len:
        lengths = [len(ex.inputs) for ex in train_examples + val_examples]
        chosen, why = default_row_length(lengths, context - prompt_tokens)
        log(f"rows of {chosen} tokens: {why} (--seq-len sets another)")
        if chosen < max(lengths):  # some examples must be cut to the chosen rows
            train_examples, val_examples, dropped = load(chosen)
        length = chosen
    if dropped:
        log(f"{dropped} example(s) dropped: no answer token fits in {length} tokens")
    train_rows = pack(shuffled(train_examples, seed), length, packing)
    val_rows = pack(val_examples, length, packing)
    if packing and "micro_batch_size" not in given:
        settings = dataclasses.replace(settings, micro_batch_size=rows_per_step(len(train_examples), len(train_rows)))
        log(f"{settings.micro_batch_size} packed rows a step: about {EXAMPLES_PER_STEP} examples, as an unpacked "
            f"batch of {EXAMPLES_PER_STEP} (--micro-batch-size sets the rows)")
    pid = base.pad_id()
    init_ids = (torch.tensor([t for ex in train_examples[:8] for t in ex.inputs]) if options.peft == "prompt"
                else None)
    model = prepare_model(model, peft, init_ids, options.merge)
    steps = steps_for(len(train_rows), settings.micro_batch_size, settings.grad_accum, options.epochs,
                      settings.max_steps)
    train_config = run_config(settings, given, steps=steps, default_lr=DEFAULT_LR[options.peft])
    trainable, total = trainable_parameters(model)
    log(f"finetune ({options.peft}): {len(train_examples)} examples in {len(train_rows)} rows of <= {length} "
        f"tokens, {len(val_examples)} for validation; {steps} steps; {trainable:,} of {total:,} parameters trained")
    task = SFTTask(model, train_rows, val_rows, pad_id=pid, micro_batch_size=settings.micro_batch_size,
                   seed=seed, tokenizer_dir=base.path, peft=peft, merge=options.merge, base=str(base.path))
    run_info = {"title": f"finetune {options.peft}", "command": "finetune", "base": str(base.path),
                "data": options.data, "val": options.val, "method": options.peft,
                "peft": options_dict(peft) if peft else None, "merge": options.merge,
                "train_examples": len(train_examples), "val_examples": len(val_examples)}
    return TuneRun(task=task, config=train_config, output=options.output, resume=options.resume, run_info=run_info,
                   model=model, peft=peft, merged=options.merge, base=str(base.path),
                   summary_fields={"command": "finetune", "method": options.peft,
                                   "train_examples": len(train_examples), "val_examples": len(val_examples),
                                   "dropped": dropped})
