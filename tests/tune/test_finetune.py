"""Supervised fine-tuning: chat rendering and masks, packing, PEFT methods, the finetune command."""

import json

import pytest
import torch
from conftest import run_glm
from tuning_fixtures import make_base, make_tokenizer

from glm_cli.core.errors import DataError, UsageError
from glm_cli.core.model.config import preset
from glm_cli.core.model.transformer import KVCache, Transformer
from glm_cli.core.tokens.chat import ChatEncoder, messages_from_record
from glm_cli.core.tune.adapter_io import save_adapter
from glm_cli.core.tune.peft import (
    PeftConfig,
    apply_peft,
    base_state,
    disabled,
    merge_lora,
    peft_modules,
    trainable_parameters,
)
from glm_cli.core.tune.sft_data import IGNORE, Example, RowLoader, collate, make_example, pack


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def encoder(tok_dir):
    from glm_cli.core.tokens.tokenizer import load_tokenizer

    return ChatEncoder(load_tokenizer(tok_dir))


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who speaks: to be, or not to be?"},
    {"role": "assistant", "content": "Hamlet"},
    {"role": "user", "content": " and then\n\n"},
    {"role": "assistant", "content": "  the question. "},
]


# -------------------------------------------------------------------------------------------- chat


def test_render_matches_hf_chat_template(tok_dir, encoder):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    for messages, gen in [(CONVERSATION, False), (CONVERSATION[:2], True), (CONVERSATION[1:3], False)]:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        expected_ids = hf(expected, add_special_tokens=False)["input_ids"]
        assert encoder.render(messages, add_generation_prompt=gen).ids == expected_ids


def test_loss_mask_covers_every_assistant_turn_and_nothing_else(encoder):
    r = encoder.render(CONVERSATION)
    tok = encoder.tokenizer
    masked = tok.decode([i for i, m in zip(r.ids, r.mask, strict=True) if m], skip_special_tokens=False)
    assert masked == "Hamlet<|end|>  the question. <|end|>"
    # the answer + <|end|> of each turn, as contiguous runs: two runs for two assistant turns
    runs = sum(1 for i in range(len(r.mask)) if r.mask[i] and (i == 0 or not r.mask[i - 1]))
    assert runs == 2
    prompt, response = encoder.prompt_and_response(CONVERSATION[:4], "  the question. ")
    assert prompt + response == r.ids[:len(prompt) + len(response)]
    assert tok.decode(response, skip_special_tokens=False) == "  the question. <|end|>"


def test_records_prompt_response_and_errors():
    m = messages_from_record({"prompt": "Q", "response": "A", "system": "S"})
    assert [x["role"] for x in m] == ["system", "user", "assistant"]
    with pytest.raises(DataError, match="f.jsonl:3"):
        messages_from_record({"prompt": "Q"}, "f.jsonl", 3)
    with pytest.raises(DataError, match="no assistant turn"):
        messages_from_record({"messages": [{"role": "user", "content": "hi"}]})


def test_response_only_targets(encoder):
    r = encoder.render(CONVERSATION)
    ex = make_example(r.ids, r.mask, 1000)
    assert len(ex.inputs) == len(ex.targets) == len(r.ids) - 1
    kept = [t for t in ex.targets if t != IGNORE]
    assert kept == [i for i, m in zip(r.ids[1:], r.mask[1:], strict=True) if m]
    cut = make_example(r.ids, r.mask, 12)  # too long: the prompt is cut from the left, the last answer kept
    assert len(cut.inputs) == 12 and cut.targets[-1] == encoder.end_id
    assert make_example(r.ids, r.mask[:-9] + [False] * 9, 12) is not None
    assert make_example(r.ids, [False] * len(r.ids), 12) is None  # nothing to learn


# ----------------------------------------------------------------------------------------- packing


def test_packed_logits_equal_separate_logits():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    examples = [Example(torch.randint(6, 500, (n,)).tolist(), [1] * n) for n in (7, 12, 5, 9)]
    rows = pack(examples, seq_len=32)
    assert len(rows) == 2 and sum(len(r.inputs) for r in rows) == 33
    batch = collate(rows, pad_id=1)
    packed = model(batch["input_ids"], positions=batch["positions"], mask=batch["mask"])
    for row_index, row in enumerate(rows):
        start = 0
        for seg in sorted(set(row.segments)):
            n = row.segments.count(seg)
            alone = model(torch.tensor([row.inputs[start:start + n]]))
            torch.testing.assert_close(packed[row_index, start:start + n], alone[0], atol=1e-5, rtol=1e-5)
            start += n


def test_loader_cursor_resumes_exactly():
    rows = pack([Example([i + 6] * 3, [i + 6] * 3) for i in range(10)], seq_len=6)
    a = RowLoader(rows, batch_size=2, pad_id=1, seed=3)
    batches = [a.next_batch()["input_ids"] for _ in range(7)]  # crosses an epoch boundary (5 rows)
    b = RowLoader(rows, batch_size=2, pad_id=1, seed=3)
    for _ in range(4):
        b.next_batch()
    c = RowLoader(rows, batch_size=2, pad_id=1, seed=3)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    for expected in batches[4:]:
        assert torch.equal(c.next_batch()["input_ids"], expected)


# -------------------------------------------------------------------------------------------- PEFT


def test_lora_merge_gives_identical_logits():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    idx = torch.randint(0, 512, (2, 16))
    base_logits = model(idx)
    lora = apply_peft(model, PeftConfig(method="lora", rank=4, alpha=8, targets=["all-linear"]))
    for m in peft_modules(lora):
        torch.nn.init.normal_(m.lora_B, 0.0, 0.05)  # as if trained
    trained = lora(idx)
    assert (trained - base_logits).abs().max() > 1e-2
    with disabled(lora):
        torch.testing.assert_close(lora(idx), base_logits)
    trainable, total = trainable_parameters(lora)
    assert 0 < trainable < total / 5
    assert "model.layers.0.self_attn.q_proj.weight" in base_state(lora)
    merged = merge_lora(lora)
    assert not peft_modules(merged)
    torch.testing.assert_close(merged(idx), trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "adapter", "prompt"])
def test_adapter_save_and_load_roundtrip(tmp_path, method):
    torch.manual_seed(0)
    config = preset("tiny")
    from glm_cli.core.checkpoint.directory import save_checkpoint

    save_checkpoint(tmp_path / "base", Transformer(config))
    cfg = PeftConfig(method=method, rank=2, adapter_dim=4, prompt_tokens=3)
    # start from the saved base, then perturb the trainable tensors
    from glm_cli.core.load import load_model

    model = apply_peft(load_model(tmp_path / "base"), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    idx = torch.randint(0, 512, (1, 10))
    expected = model(idx)
    save_adapter(tmp_path / "adapter", model, cfg)
    from glm_cli.core.load import load_with_adapter

    loaded = load_with_adapter(tmp_path / "base", tmp_path / "adapter")
    torch.testing.assert_close(loaded(idx), expected)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_prompt_tuning_cache_and_positions_consistent():
    torch.manual_seed(0)
    model = apply_peft(Transformer(preset("tiny")).eval(), PeftConfig(method="prompt", prompt_tokens=4))
    idx = torch.randint(0, 512, (2, 9))
    full = model(idx)
    cache = KVCache(model.config, 2, 9, "cpu", torch.float32)
    steps = [model(idx[:, :5], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_peft_config_validation():
    with pytest.raises(UsageError, match="unknown LoRA target"):
        PeftConfig(targets=["qproj"])
    assert "down_proj" in PeftConfig(targets=["all-linear"]).targets


# ------------------------------------------------------------------------------------ through the engine


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("ft"))


def _sft_task(base_dir, peft_cfg):
    from glm_cli.core.load import load_model
    from glm_cli.core.tokens.tokenizer import load_tokenizer
    from glm_cli.core.tune.sft import SFTTask
    from glm_cli.core.tune.sft_data import load_examples

    encoder = ChatEncoder(load_tokenizer(base_dir))
    train, _ = load_examples(str(base_dir.parent / "sft.jsonl"), encoder, 64)
    val, _ = load_examples(str(base_dir.parent / "sft_val.jsonl"), encoder, 64)
    torch.manual_seed(0)
    model = apply_peft(load_model(base_dir), peft_cfg).train()
    return SFTTask(model, pack(train, 64), pack(val, 64), pad_id=1, micro_batch_size=2, seed=1,
                   tokenizer_dir=base_dir, peft=peft_cfg, base=str(base_dir))


def test_lora_run_resumes_exactly(base_dir, tmp_path):
    from glm_cli.core.checkpoint.directory import load_tensors
    from glm_cli.core.train.trainer import TrainConfig, Trainer

    cfg = PeftConfig(method="lora", rank=2, dropout=0.1, targets=["all-linear"])
    config = TrainConfig(lr=1e-2, max_steps=6, warmup_steps=2, checkpoint_every=3, eval_every=0,
                         micro_batch_size=2, peak_flops=1.0, log_every=0)
    full = Trainer(_sft_task(base_dir, cfg), config, tmp_path / "a").fit()
    resumed = Trainer(_sft_task(base_dir, cfg), config, tmp_path / "b",
                      resume=tmp_path / "a" / "checkpoints" / "step-000003").fit()
    a = load_tensors(full.final_dir / "adapter.safetensors")
    b = load_tensors(resumed.final_dir / "adapter.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7  # A and B of every projection of the one block
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.metrics["val_loss"] == resumed.metrics["val_loss"]
    # the checkpoint is the untouched base + the adapter; loading both reproduces the trained model
    from glm_cli.core.load import load_with_adapter

    saved, base = load_tensors(full.final_dir / "model.safetensors"), load_tensors(base_dir / "model.safetensors")
    assert saved.keys() == base.keys()
    for name in base:  # every projection LoRA wrapped included: the adapter lives beside, never merged in
        assert torch.equal(saved[name], base[name]), name
    assert peft_modules(load_with_adapter(full.final_dir))


def test_finetune_command_lora_merge(base_dir, tmp_path):
    d = base_dir.parent
    r = run_glm("finetune", base_dir, "--data", d / "sft.jsonl", "--val", d / "sft_val.jsonl", "-o", tmp_path / "run",
                "--peft", "lora", "--merge", "--max-steps", "3", "--set", "peak_flops=1", "--json", check=True)
    summary = json.loads(r.stdout)
    assert summary["steps"] == 3 and summary["trainable_params"] < summary["total_params"] / 10
    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()  # merged: a plain checkpoint
    from transformers import AutoModelForCausalLM

    from glm_cli.core.load import load_model

    hf = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    ours = load_model(final)
    idx = torch.randint(6, 400, (1, 12))
    torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-4, rtol=1e-4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\n{"prompt": 3}\n')
    r = run_glm("finetune", base_dir, "--data", bad, "-o", tmp_path / "x")
    assert r.returncode == 1 and f"{bad}:2:" in r.stderr.decode()


def test_finetune_and_align_layer_settings_like_pretrain(base_dir, tmp_path):
    """Defaults < --config < --set < typed options, in both commands; a default never overrides --config."""
    d = base_dir.parent
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"max_steps": 5, "lr": 0.01, "weight_decay": 0.05, "micro_batch_size": 4,
                                  "warmup_steps": 4}))
    common = ["--data", d / "sft.jsonl", "--val", d / "sft_val.jsonl", "--config", config, "--set", "peak_flops=1",
              "--json"]
    r = run_glm("finetune", base_dir, *common, "-o", tmp_path / "a", "--set", "max_steps=3", check=True)
    assert json.loads(r.stdout)["steps"] == 3
    saved = json.loads((tmp_path / "a" / "run.json").read_text())["train_config"]
    assert (saved["lr"], saved["weight_decay"], saved["micro_batch_size"], saved["warmup_steps"]) == (
        0.01, 0.05, 4, 4)  # the config's, not the command's defaults (8, a warmup cut to half the run)
    r = run_glm("finetune", base_dir, *common, "-o", tmp_path / "b", "--set", "max_steps=3", "--max-steps", "2",
                "--dtype", "float32", check=True)
    assert json.loads(r.stdout)["steps"] == 2
    assert json.loads((tmp_path / "b" / "run.json").read_text())["train_config"]["dtype"] == "fp32"
    r = run_glm("align", base_dir, "--data", d / "prefs.jsonl", "--val", d / "prefs_val.jsonl", "-o",
                tmp_path / "c", "--config", config, "--set", "max_steps=2", "--set", "peak_flops=1", "--json",
                check=True)
    assert json.loads(r.stdout)["steps"] == 2
    assert json.loads((tmp_path / "c" / "run.json").read_text())["train_config"]["lr"] == 0.01
    for bad, words in ((["--set", "betas=0.9"], "--set betas='0.9': expected 2 comma-separated floats"),
                       (["--set", "nope=1"], "unknown setting 'nope'"),
                       (["--dtype", "fp16"], "dtype fp16 is not supported in training")):
        for command, data in (("finetune", "sft.jsonl"), ("align", "prefs.jsonl")):
            r = run_glm(command, base_dir, "--data", d / data, "-o", tmp_path / "x", *bad)
            err = r.stderr.decode()
            assert r.returncode == 2 and words in err and len(err.strip().splitlines()) == 1, (command, err)


def test_qlora_trains_lora_on_a_quantized_frozen_base(tmp_path):
    from glm_cli.core.load import load_model, load_with_adapter
    from glm_cli.core.quant.quantized_checkpoint import save_quantized
    from glm_cli.core.quant.weight_only import QuantLinear, QuantScheme, quantize_model_rtn
    from glm_cli.core.tune.sft import peft_export

    torch.manual_seed(0)
    save_quantized(tmp_path / "q8", quantize_model_rtn(Transformer(preset("tiny")), QuantScheme(bits=8)))
    cfg = PeftConfig(method="lora", rank=4, targets=["all-linear"])
    model = apply_peft(load_model(tmp_path / "q8"), cfg).train()
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, QuantLinear)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(6, 500, (2, 16))
    losses = []
    for _ in range(5):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    expected = model(idx)
    peft_export(model, cfg, merge=False, tokenizer_dir=None, base=None).save(tmp_path / "out", model)
    loaded = load_with_adapter(tmp_path / "out")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj.base, QuantLinear)
    torch.testing.assert_close(loaded(idx), expected)


# ------------------------------------------------------------------------------------ row length


def test_default_row_length_from_the_data():
    from glm_cli.core.tune.sft_data import default_row_length

    assert default_row_length([43, 80, 12], context=8192) == (
        128, "the longest example (80 tokens) rounded up to a multiple of 64")
    assert default_row_length([64], context=8192)[0] == 64
    length, why = default_row_length([5000, 30], context=8192)
    assert length == 2048 and "more than the cap of 2048" in why
    length, why = default_row_length([300], context=256)
    assert length == 256 and "the model's context" in why


def test_finetune_chooses_and_logs_its_row_length(base_dir, tmp_path):
    """Without --seq-len the rows are as long as the longest example (rounded up), not the context;
    --seq-len still decides when given."""
    from glm_cli.core.tune.sft_data import ROW_MULTIPLE

    d = base_dir.parent
    common = ["--data", d / "sft.jsonl", "--val", d / "sft_val.jsonl", "--peft", "lora", "--max-steps", "1",
              "--set", "peak_flops=1"]
    r = run_glm("finetune", base_dir, *common, "-o", tmp_path / "a", check=True)
    err = r.stderr.decode()
    line = next(x for x in err.splitlines() if x.startswith("rows of "))
    length = int(line.split()[2])
    assert "the longest example" in line and length % ROW_MULTIPLE == 0, line
    context = json.loads((base_dir / "config.json").read_text())["max_position_embeddings"]
    assert length < context
    assert f"rows of <= {length} tokens" in err
    r = run_glm("finetune", base_dir, *common, "-o", tmp_path / "b", "--seq-len", "40", check=True)
    err = r.stderr.decode()
    assert "rows of <= 40 tokens" in err and not any(x.startswith("rows of ") for x in err.splitlines())


# ------------------------------------------------------------------------------ memory and precision


def test_activation_checkpointing_flag_changes_memory_not_results(base_dir, tmp_path):
    """--activation-checkpointing recomputes blocks in the backward pass: same losses to the bit."""
    d = base_dir.parent
    common = ["--data", d / "sft.jsonl", "--val", d / "sft_val.jsonl", "--peft", "lora", "--max-steps", "3",
              "--set", "peak_flops=1", "--json"]
    plain = json.loads(run_glm("finetune", base_dir, *common, "-o", tmp_path / "a", check=True).stdout)
    ckpt = json.loads(run_glm("finetune", base_dir, *common, "-o", tmp_path / "b", "--activation-checkpointing",
                              check=True).stdout)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["train_config"]["activation_checkpointing"]
    assert not json.loads((tmp_path / "a" / "run.json").read_text())["train_config"]["activation_checkpointing"]
    assert (ckpt["train_loss"], ckpt["val_loss"]) == (plain["train_loss"], plain["val_loss"])


def test_bf16_note_only_where_the_cpu_emulates_it(monkeypatch):
    from glm_cli.core.tune import precision

    assert precision.cpu_bf16_flags("flags\t: fpu avx2 avx512f\n") == []
    assert precision.cpu_bf16_flags("flags\t: fpu avx512_bf16 amx_bf16\n") == ["avx512_bf16", "amx_bf16"]
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    assert "emulates" in precision.cpu_bf16_note("cpu", "bf16")
    assert precision.cpu_bf16_note("cpu", "fp32") is None and precision.cpu_bf16_note("cuda", "bf16") is None
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["amx_bf16"])
    assert precision.cpu_bf16_note("cpu", "bf16") is None


def test_sft_loss_on_answer_logits_equals_the_masked_full_pass():
    """SFTTask projects only answer positions onto the vocabulary, through segment attention: the same
    loss and gradients as full logits over the dense block-diagonal mask."""
    from glm_cli.core.tune.sft import SFTTask
    from glm_cli.core.tune.sft_data import collate_packed

    torch.manual_seed(0)
    model = Transformer(preset("tiny", n_kv_heads=2))
    exs = [Example(list(range(5, 5 + n)), [IGNORE] * (n // 2) + list(range(9, 9 + n - n // 2))) for n in (7, 12, 30, 3)]
    rows = pack(exs, 40)
    task = SFTTask(model, rows, rows, pad_id=1, micro_batch_size=4)
    got, metrics = task.loss(model, collate_packed(rows, 1))
    got.backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    dense = collate(rows, 1)
    _, want = model(dense["input_ids"], dense["targets"], positions=dense["positions"], mask=dense["mask"])
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert metrics["answer_tokens"] == sum(t != IGNORE for ex in exs for t in ex.targets)
    for a, b in zip(got_grads, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_default_batch_of_packed_rows_holds_about_eight_examples():
    """Packed rows hold several examples each; left alone, a step takes the rows of ~8 examples (the step
    count of an unpacked batch of 8), never fewer than one row nor more than 8."""
    from glm_cli.core.tune.finetune_setup import rows_per_step

    assert rows_per_step(96, 44) == 4  # 2.2 examples a row: the README benchmark's data
    assert rows_per_step(32, 16) == 4
    assert rows_per_step(8, 8) == 8  # one example a row: an unpacked batch
    assert rows_per_step(100, 5) == 1  # 20 examples a row: one row a step
    assert rows_per_step(0, 0) == 8  # no data (refused later): no division by zero here


def test_build_finetune_counts_the_default_batch_in_examples_unless_given(tmp_path):
    from glm_cli.core.load.tuning_base import load_tuning_base
    from glm_cli.core.tune.finetune_setup import FinetuneOptions, build_finetune, rows_per_step

    base = load_tuning_base(make_base(tmp_path))
    data = str(tmp_path / "sft.jsonl")
    chosen = build_finetune(FinetuneOptions(data=data, output=str(tmp_path / "a"), seq_len=64), base)
    n_examples = chosen.summary_fields["train_examples"]
    n_rows = len(chosen.task.train_rows)
    assert n_rows < n_examples  # the fixture's examples do share rows at 64 tokens
    assert chosen.config.micro_batch_size == rows_per_step(n_examples, n_rows)
    given = build_finetune(FinetuneOptions(data=data, output=str(tmp_path / "b"), seq_len=64,
                                           settings={"micro_batch_size": 8}), load_tuning_base(make_base(tmp_path)))
    assert given.config.micro_batch_size == 8
    unpacked = build_finetune(FinetuneOptions(data=data, output=str(tmp_path / "c"), packing=False),
                              load_tuning_base(make_base(tmp_path)))
    assert unpacked.config.micro_batch_size == 8
