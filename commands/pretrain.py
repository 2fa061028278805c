"""`glm pretrain`: train a Transformer from scratch on token shards (one CPU, one GPU, or torchrun)."""

from __future__ import annotations

from typing import Annotated

import typer

from glm_cli.commands._common import (
    JsonSummary,
    Quiet,
    TrainConfigFile,
    TrainDevice,
    TrainDtype,
    TrainSeed,
    TrainSet,
    given_flags,
)
from glm_cli.core.field_docs import data_doc, train_doc

PRESET = "Default: the preset's."

EPILOG = """Examples:

  glm pretrain runs/demo/shards -o runs/demo/pretrain --preset cpu --max-steps 2800

  glm pretrain --data web:0.7 --data books:0.3 -o runs/mix --preset 124m --set dim=512 --set n_layers=8

  torchrun --nproc_per_node=8 -m glm_cli pretrain shards/ -o runs/124m --preset 124m --fsdp

  glm pretrain shards/ -o runs/demo/pretrain --resume      (continue exactly where it stopped)

Settings come from, in increasing priority: the preset, --config FILE.json (a flat object of model and
training fields), --set KEY=VALUE, and the options typed on the command line; finetune and align read
them the same way. Model fields: vocab_size, dim, n_layers, n_heads, n_kv_heads, ffn_dim, max_seq_len,
rope_theta, norm_eps, tie_embeddings, dropout, init_std, ... (core.model.config.ModelConfig). Training
fields: core.train.settings.TrainConfig (lr, min_lr_ratio, warmup_steps, betas, ...) and PretrainData
(sampling, eval_tokens, eval_batch_size, curriculum_start, curriculum_steps).
"""


def command(
    ctx: typer.Context,
    shards: Annotated[list[str] | None, typer.Argument(
        help="Token shard directories (from `glm tokenize encode`), each optionally DIR:WEIGHT.")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Run directory: checkpoints/, best/, final/, "
                                        "metrics.jsonl, curves.png.")] = "",
    data: Annotated[list[str] | None, typer.Option(
        "--data", help="A shard directory with a mixture weight, DIR:WEIGHT (repeatable); same as a "
        "positional DIR:WEIGHT.")] = None,
    preset: Annotated[str, typer.Option(help="Model size and training defaults: tiny, cpu, 124m, 350m, 1b.")]
    = "cpu",
    config: TrainConfigFile = None,
    set_: TrainSet = None,
    max_steps: Annotated[int | None, typer.Option(help=train_doc("max_steps", PRESET))] = None,
    time_budget: Annotated[float | None, typer.Option(help=train_doc("time_budget"))] = None,
    lr: Annotated[float | None, typer.Option(help=train_doc("lr", PRESET))] = None,
    micro_batch_size: Annotated[int | None, typer.Option("--micro-batch-size", "-b",
                                                         help=train_doc("micro_batch_size", PRESET))] = None,
    grad_accum: Annotated[int | None, typer.Option(help=train_doc("grad_accum", PRESET))] = None,
    batch_tokens: Annotated[int | None, typer.Option(help=train_doc("batch_tokens", PRESET))] = None,
    optimizer: Annotated[str | None, typer.Option(help=train_doc("optimizer", PRESET))] = None,
    eval_every: Annotated[int | None, typer.Option(help=train_doc("eval_every", PRESET))] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help=train_doc("checkpoint_every"))] = None,
    sampling: Annotated[str | None, typer.Option(help=data_doc("sampling"))] = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer.json (or its directory) to ship in the "
                                                  "checkpoints; default: beside the shards.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run "
                                         "directory, exactly.")] = False,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Under torchrun: shard parameters, gradients and "
                                       "optimizer state (FSDP2) instead of DDP.")] = False,
    device: TrainDevice = "auto",
    dtype: TrainDtype = "auto",
    compile: Annotated[bool, typer.Option("--compile", help=train_doc("compile"))] = False,
    seed: TrainSeed = 0,
    as_json: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    import os

    from glm_cli.core.console import set_quiet
    from glm_cli.core.train.pretrain_setup import PretrainOptions, build_run

    if quiet or int(os.environ.get("RANK", "0")) != 0:
        set_quiet(True)
    flags = given_flags(ctx, {"max_steps": max_steps, "time_budget": time_budget, "lr": lr,
                              "micro_batch_size": micro_batch_size, "grad_accum": grad_accum,
                              "batch_tokens": batch_tokens, "optimizer": optimizer, "eval_every": eval_every,
                              "checkpoint_every": checkpoint_every, "sampling": sampling, "dtype": dtype,
                              "seed": seed, "device": device, "compile": compile})
    if fsdp:
        flags["parallel"] = "fsdp"
    options = PretrainOptions(sources=list(shards or []) + list(data or []), output=output, preset=preset,
                              config_file=config, sets=list(set_ or []), flags=flags, tokenizer=tokenizer,
                              resume=resume)
    trainer, summary = build_run(options)
    result = trainer.fit()
    summary.update(step=result.step, status=result.status, metrics=result.metrics, train_loss=result.train_loss,
                   tokens=result.tokens, elapsed_s=round(result.elapsed, 1),
                   tokens_per_s=round(result.tokens_per_second), mfu=round(result.mfu, 4),
                   skipped_steps=result.skipped_steps, rollbacks=result.rollbacks,
                   attention_backend=result.attention_backend, parallel=result.parallel,
                   world_size=result.world_size,
                   final=str(result.final_dir) if result.final_dir else None,
                   best=str(result.best_dir) if result.best_dir else None,
                   last_checkpoint=str(result.last_checkpoint))
    from glm_cli.commands._common import emit_summary
    from glm_cli.core.console import log

    if int(os.environ.get("RANK", "0")) == 0:
        m = result.metrics
        if "val_bpb" in m:
            log(f"val loss {m['val_loss']:.4f} nats/token, {m['val_bpb']:.4f} bits/byte "
                f"({int(m.get('val_tokens', 0))} held-out tokens) after {result.step} steps, "
                f"{result.elapsed:.0f} s, {result.tokens_per_second:.0f} tokens/s, MFU {100 * result.mfu:.1f}%")
        log(f"{result.status}: {result.final_dir or result.last_checkpoint}")
        emit_summary(summary, as_json, data_on_stdout=False)
    if result.status == "interrupted":
        raise typer.Exit(130)


command.__doc__ = "Pretrain a Transformer on token shards (CPU, GPU, torchrun).\n\n" + EPILOG
