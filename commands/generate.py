"""`glm generate`: complete prompts with a checkpoint (greedy, sampling, beam search, contrastive).

Example:
    glm generate runs/demo/pretrain/final "HAMLET." --max-new-tokens 60 --temperature 0.8 --top-p 0.95
    glm generate ckpt --prompts prompts.jsonl -o out.jsonl --batch-size 16 --seed 1
    echo "What is the name of Hamlet's mother?" | glm generate runs/demo/finetune/final --chat
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from glm_cli.commands._common import JsonSummary, Output, Quiet, Seed, emit_summary, flag_name
from glm_cli.commands._model_options import DeviceOpt, DtypeOpt, resolve_device_dtype
from glm_cli.core.field_docs import field_doc


def _sampling_doc(name: str, extra: str = "") -> str:
    """The help of a flag that sets `SamplingConfig.<name>`: the field's docstring, declared once in core."""
    return field_doc("glm_cli.core.infer.sampling", "SamplingConfig", name, extra)


def _generation_doc(name: str, extra: str = "") -> str:
    """The help of a flag that sets `GenerationConfig.<name>`."""
    return field_doc("glm_cli.core.infer.generation", "GenerationConfig", name, extra, flags=flag_name)


def parse_logit_bias(items: list[str], tokenizer) -> dict[int, float]:
    """'ID=VALUE' or 'TEXT=VALUE' (TEXT must be a single token)."""
    from glm_cli.core.errors import UsageError

    bias = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            raise UsageError(f"--logit-bias {item!r}: expected TOKEN_ID=VALUE or TEXT=VALUE")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--logit-bias {item!r}: {value!r} is not a number") from None
        if key.isdigit():
            bias[int(key)] = number
            continue
        ids = tokenizer.encode(key, add_special_tokens=False).ids
        if len(ids) != 1:
            raise UsageError(f"--logit-bias {item!r}: {key!r} is {len(ids)} tokens; give one token or its id")
        bias[ids[0]] = number
    return bias


def command(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint directory (glm or Hugging Face "
                                                   "Llama format). Example: glm generate runs/demo/pretrain/final "
                                                   "'HAMLET.' -n 60 --temperature 0.8 --top-p 0.95")],
    prompt: Annotated[str | None, typer.Argument(help="The prompt; '-' or omitted with piped input reads stdin.")] = None,
    prompt_file: Annotated[str | None, typer.Option("--prompt-file", help="Read one prompt from this file.")] = None,
    prompts: Annotated[str | None, typer.Option("--prompts", help="JSONL of prompts ({\"prompt\": ...} or "
                                                "{\"messages\": [...]}); runs in batches, writes JSONL.")] = None,
    output: Output = "-",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help=_generation_doc("max_new_tokens"))] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help=_sampling_doc("temperature"))] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help=_sampling_doc("top_k"))] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help=_sampling_doc("top_p"))] = 1.0,
    min_p: Annotated[float, typer.Option("--min-p", help=_sampling_doc("min_p"))] = 0.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help=_sampling_doc("repetition_penalty",
                                                                                           "E.g. 1.2."))] = 1.0,
    frequency_penalty: Annotated[float, typer.Option("--frequency-penalty", help=_sampling_doc("frequency_penalty"))] = 0.0,
    presence_penalty: Annotated[float, typer.Option("--presence-penalty", help=_sampling_doc("presence_penalty"))] = 0.0,
    logit_bias: Annotated[list[str] | None, typer.Option("--logit-bias", help="ID=VALUE or TEXT=VALUE added to "
                                                         "that token's logit; repeatable.")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help=_generation_doc("stop", "Repeatable."))] = None,
    num_beams: Annotated[int, typer.Option("--num-beams", min=1, help=_generation_doc("num_beams"))] = 1,
    length_penalty: Annotated[float, typer.Option("--length-penalty",
                                                  help=_generation_doc("length_penalty"))] = 1.0,
    adapter: Annotated[str | None, typer.Option("--adapter", help="Adapter directory from `glm finetune` "
                                                "(LoRA, bottleneck adapters or prompt tuning) to load on the "
                                                "checkpoint; one saved inside the checkpoint is picked up anyway.")] = None,
    amateur: Annotated[str | None, typer.Option("--amateur", help="Smaller checkpoint (same tokenizer) for "
                                                "contrastive decoding.")] = None,
    contrastive_alpha: Annotated[float, typer.Option("--contrastive-alpha", help="Contrastive decoding keeps "
                                                     "tokens with p >= alpha * max p.")] = 0.1,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the chat template (for "
                                       "fine-tuned checkpoints) and stop at the end of the answer.")] = False,
    system: Annotated[str | None, typer.Option("--system", help="System message in --chat mode.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Prompts per batch with --prompts.")] = 16,
    seed: Seed = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonSummary = False,
    quiet: Quiet = False,
) -> None:
    """Generate text from a checkpoint.

    Example: glm generate runs/demo/pretrain/final "HAMLET." -n 60 --temperature 0.8 --top-p 0.95
    """
    import time

    import torch

    from glm_cli.core.console import log, set_quiet
    from glm_cli.core.errors import GlmError, UsageError
    from glm_cli.core.infer.generation import GenerationConfig, eos_ids_for, generate
    from glm_cli.core.infer.prepare import prepare_for_inference
    from glm_cli.core.infer.records import generate_records, prompt_encoder, read_prompt_records
    from glm_cli.core.infer.sampling import SamplingConfig
    from glm_cli.core.load import load_model, load_with_adapter
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    set_quiet(quiet)
    sources = [s for s in (prompt, prompt_file, prompts) if s is not None]
    if len(sources) > 1:
        raise UsageError("give the prompt one way: an argument, --prompt-file or --prompts")
    if num_beams > 1 and amateur:
        raise UsageError("use just one of --num-beams and --amateur")
    device, torch_dtype = resolve_device_dtype(device, dtype)
    model = load_with_adapter(checkpoint, adapter, device=device, dtype=torch_dtype)
    tokenizer = load_tokenizer(checkpoint)
    amateur_model = load_model(amateur, device=device, dtype=torch_dtype) if amateur else None
    for m in (model, amateur_model):
        if m is not None:
            prepared = prepare_for_inference(m)
            native = ", glm's native CPU decode step" if prepared["native_decode"] else ""
            log(f"decoding with {prepared['fused_projections']} fused projection groups, "
                f"{prepared['packed_linears']} oneDNN-packed linears{native}")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                                presence_penalty=presence_penalty,
                                logit_bias=parse_logit_bias(logit_bias or [], tokenizer)),
        stop=list(stop or []), eos_ids=eos_ids_for(model.config, tokenizer, checkpoint), num_beams=num_beams,
        length_penalty=length_penalty, contrastive_alpha=contrastive_alpha)
    config.validate()
    encoder = None
    if chat:
        from glm_cli.core.tokens.chat_template import chat_encoder_for

        encoder = chat_encoder_for(checkpoint, tokenizer)
        end_id = encoder.end_id  # the template's end of turn, in case the checkpoint does not list it
        if end_id is not None and end_id not in config.eos_ids:
            config.eos_ids = sorted(config.eos_ids + [end_id])

    encode = prompt_encoder(tokenizer, model.config, encoder, system)

    generator = torch.Generator(device=device).manual_seed(seed)
    started = time.perf_counter()
    if prompts is not None:
        records = read_prompt_records(prompts)
        counts = generate_records(model, tokenizer, records, output, config, encode=encode, batch_size=batch_size,
                                  amateur=amateur_model, generator=generator, source=prompts,
                                  on_batch=lambda done, total: log(f"generated {done}/{total}"))
        elapsed = time.perf_counter() - started
        emit_summary({**counts, "output": output, "seconds": round(elapsed, 3),
                      "completion_tokens_per_s": round(counts["completion_tokens"] / max(elapsed, 1e-9), 1)},
                     as_json, data_on_stdout=output == "-")
        return

    if prompt_file is not None:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GlmError(f"{prompt_file}: cannot read the prompt ({e})") from None
    elif prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise UsageError("no prompt: give one as an argument, with --prompt-file or --prompts, or on stdin")
        text = sys.stdin.read()
        if chat:
            text = text.rstrip("\n")
    else:
        text = prompt
    ids = encode({"prompt": text})
    stream = sys.stdout.isatty() and not as_json and num_beams == 1 and output == "-"

    def on_text(row: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = generate(model, [ids], config, tokenizer=tokenizer, amateur=amateur_model,
                      on_text=on_text if stream else None, generator=generator)[0]
    elapsed = time.perf_counter() - started
    record = {"prompt": text, "completion": result.text, "prompt_tokens": result.prompt_tokens,
              "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason}
    if result.score is not None:
        record["score"] = result.score
    if as_json:
        payload = json.dumps({**record, "seconds": round(elapsed, 3)}, ensure_ascii=False, indent=2) + "\n"
    else:
        payload = ("" if stream else result.text) + "\n"
    if output == "-":
        sys.stdout.write(payload)
        sys.stdout.flush()
    else:
        from glm_cli.core.io.atomic import write_text_atomic

        write_text_atomic(output, payload if as_json else result.text)
    log(f"{result.completion_tokens} tokens in {elapsed:.2f}s ({result.finish_reason})")
