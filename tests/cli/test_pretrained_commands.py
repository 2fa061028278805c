"""Every model command on a checkpoint glm did not train: a SmolLM2-shaped model that transformers saved,
with its own ChatML tokenizer, chat template and generation config, used as it is (no conversion).

The model is tiny and random; what is checked is that each command accepts it, runs the model's own
math and template, and agrees with transformers where there is a reference to agree with.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from glm_cli.app import app

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 4


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A transformers-saved Llama (SmolLM2's config form: theta 1e5, tied, GQA) with a ChatML tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("pretrained") / "smol"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator([TEXT] * 5, trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                                            show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                  unk_token="<|endoftext|>", chat_template=CHATML)
    hf_tok.save_pretrained(directory)
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=100000.0,
                                      max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory, model, hf_tok


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise AssertionError(f"glm {' '.join(map(str, args))} exited {result.exit_code}: "
                             f"{result.output}\n{result.exception!r}")
    return result


def test_generate_greedy_equals_transformers(pretrained, tmp_path):
    directory, model, hf_tok = pretrained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "To be, or not"}) + "\n")
    out = tmp_path / "out.jsonl"
    invoke("generate", directory, "--prompts", prompts, "-o", out, "-n", "12")
    ours = json.loads(out.read_text())
    ids = hf_tok("To be, or not", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    # transformers stops at the eos <|im_end|> too; compare the tokens up to it
    expected = expected.tolist()
    if 2 in expected:
        expected = expected[:expected.index(2)]
    assert ours["completion"] == hf_tok.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("strategy", [["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"],
                                      ["--num-beams", "2"], ["--top-k", "4", "--contrastive-alpha", "0.5"],
                                      ["--min-p", "0.1", "--temperature", "1.0", "--repetition-penalty", "1.2"]])
def test_generate_every_strategy_runs(pretrained, strategy):
    directory, _, _ = pretrained
    result = invoke("generate", directory, "To be", "-n", "6", *strategy)
    assert result.stdout.rstrip("\n") != ""  # the completion (a random model: any six tokens)


def steered(directory, target, winner: int):
    """A copy of the model whose greedy choice is always token `winner`: every embedding writes +10 into
    dimension 0, no layer writes there, the final norm keeps only that dimension, and an untied head
    reads it into `winner`'s logit alone (the end-of-turn token gets -1 x it otherwise)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(directory, target)
    state = load_file(str(target / "model.safetensors"))
    embed = state["model.embed_tokens.weight"].clone()
    embed[:, 0] = 10.0
    state["model.embed_tokens.weight"] = embed
    for name in list(state):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = state[name].clone()
            state[name][0] = 0.0
    state["model.norm.weight"] = torch.zeros_like(state["model.norm.weight"])
    state["model.norm.weight"][0] = 1.0
    head = torch.zeros_like(embed)
    head[2, 0] = -1.0  # <|im_end|>
    head[winner, 0] = 1.0
    state["lm_head.weight"] = head
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return target


def test_chat_uses_the_models_template_and_stops_at_its_end_of_turn(pretrained, tmp_path):
    directory, _, hf_tok = pretrained
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") == 2
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Who art thou?"}]}) + "\n")
    expected_prompt = hf_tok.apply_chat_template([{"role": "user", "content": "Who art thou?"}],
                                                 add_generation_prompt=True, tokenize=True)
    if not isinstance(expected_prompt, list):  # transformers 5 returns a BatchEncoding
        expected_prompt = expected_prompt["input_ids"]
    # the end of turn comes first: the answer stops there, and says so
    ends = steered(directory, tmp_path / "ends", winner=2)
    invoke("generate", ends, "--chat", "--prompts", prompts, "-o", tmp_path / "ends.jsonl", "-n", "40")
    record = json.loads((tmp_path / "ends.jsonl").read_text())
    assert record["prompt_tokens"] == len(expected_prompt)
    assert record["finish_reason"] == "stop" and record["completion_tokens"] == 0, record
    assert "<|im_end|>" not in record["completion"]
    # the end of turn never comes: all 5 tokens, stopped by the length
    runs_on = steered(directory, tmp_path / "runs_on", winner=7)
    invoke("generate", runs_on, "--chat", "--prompts", prompts, "-o", tmp_path / "runs_on.jsonl", "-n", "5")
    record = json.loads((tmp_path / "runs_on.jsonl").read_text())
    assert record["finish_reason"] == "length" and record["completion_tokens"] == 5, record
    assert record["completion"] == hf_tok.decode([7] * 5)


def test_eval_bits_per_byte_equals_transformers(pretrained, tmp_path):
    directory, model, hf_tok = pretrained
    text = TEXT[:300]
    task = tmp_path / "ppl.jsonl"
    task.write_text(json.dumps({"text": text}) + "\n")
    report = json.loads(invoke("eval", directory, "--task", task, "--json").stdout)
    ours = report["results"][str(directory)]["ppl"]["metrics"]["bits_per_byte"]
    ids = [1] + hf_tok(text, add_special_tokens=False).input_ids  # lm-eval's rolling window: bos as context
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert ours == pytest.approx(nll / (len(text.encode()) * math.log(2)), rel=1e-5)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatdata")
    lines = ["To be, or not to be", "the slings and arrows", "a sea of troubles", "nobler in the mind"]
    sft = [{"prompt": f"Continue: {a}", "response": b} for a in lines for b in lines if a != b]
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    pairs = [{"prompt": f"Continue: {a}", "chosen": b, "rejected": "no"} for a in lines for b in lines if a != b]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (d / "calib.txt").write_text(TEXT)
    (d / "held_out.txt").write_text(TEXT[::-1])
    return d


@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_on_the_pretrained_model(pretrained, chat_data, tmp_path, method):
    directory, _, _ = pretrained
    out = tmp_path / method
    summary = json.loads(invoke("finetune", directory, "--data", chat_data / "sft.jsonl", "-o", out,
                                "--peft", method, "--max-steps", "2", "--set", "peak_flops=1",
                                "--json").stdout)
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    assert summary["trainable_params"] < summary["total_params"] / (5 if method == "lora" else 0.99)
    final = out / "final"
    # the fine-tuned model keeps the base's template and end-of-turn id, so it chats the same way
    assert (final / "tokenizer.json").exists()
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] == 2
    invoke("generate", final, "--chat", "Continue: a sea of troubles", "-n", "4")


def test_qlora_on_an_int8_base_and_dpo(pretrained, chat_data, tmp_path):
    directory, _, _ = pretrained
    int8 = tmp_path / "int8"
    invoke("quantize", directory, "-o", int8, "--bits", "8")
    invoke("finetune", int8, "--data", chat_data / "sft.jsonl", "-o", tmp_path / "qlora", "--peft", "lora",
           "--max-steps", "2", "--set", "peak_flops=1")
    assert (tmp_path / "qlora" / "final" / "adapter_config.json").exists()
    invoke("align", directory, "--method", "dpo", "--data", chat_data / "pairs.jsonl", "-o", tmp_path / "dpo",
           "--max-steps", "2", "--set", "peak_flops=1")
    assert (tmp_path / "dpo" / "final").exists()


@pytest.mark.parametrize("args", [["--bits", "8"], ["--bits", "4", "--method", "rtn", "--group-size", "32"],
                                  ["--bits", "4", "--method", "gptq", "--group-size", "32", "--calibration",
                                   "CALIB", "--calibration-samples", "4", "--seq-len", "32"],
                                  ["--format", "gguf", "--gguf-type", "q8_0"]])
def test_quantize_the_pretrained_model(pretrained, chat_data, tmp_path, args):
    directory, _, _ = pretrained
    args = [str(chat_data / "calib.txt") if a == "CALIB" else a for a in args]
    out = tmp_path / ("m.gguf" if "gguf" in args else "q")
    summary = json.loads(invoke("quantize", directory, "-o", out, *args, "--eval-data", chat_data / "held_out.txt",
                                "--eval-tokens", "200", "--seq-len", "32", "--json").stdout)
    assert out.exists()
    assert abs(summary["perplexity_change_pct"]) < (5 if "8" in args or "q8_0" in args else 60)
