"""Generation: KV cache vs recomputation, padding invisibility, stopping, beam search vs brute force,
contrastive decoding vs its definition, and the `glm generate` command."""

import itertools
import json

import pytest
import torch
from conftest import invoke_glm as glm
from conftest import run_glm
from eval_fixtures import make_checkpoint

from glm_cli.core.infer.generation import GenerationConfig, TextTracker, beam_search, generate
from glm_cli.core.infer.sampling import SamplingConfig, contrastive_scores
from glm_cli.core.model.config import preset
from glm_cli.core.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only add contention


def tiny(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", tie_embeddings=False, **overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper than a random init, so paths are not near-ties
    return model


def recompute_greedy(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def test_kv_cache_decoding_equals_full_recomputation():
    model = tiny()
    for prompt in PROMPTS:
        out = generate(model, [prompt], GenerationConfig(max_new_tokens=12))[0]
        assert out.tokens == recompute_greedy(model, prompt, 12)
        assert out.finish_reason == "length"


def test_left_padded_batch_equals_each_row_alone():
    model = tiny()
    config = GenerationConfig(max_new_tokens=12)
    batch = generate(model, PROMPTS, config)
    for prompt, row in zip(PROMPTS, batch, strict=True):
        assert row.tokens == generate(model, [prompt], config)[0].tokens
        assert row.prompt_tokens == len(prompt)


def test_rows_stop_independently_on_eos():
    model = tiny()
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10))
    eos = free[0].tokens[3]  # row 0 will produce this at step 3
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, eos_ids=[eos]))
    assert out[0].tokens == free[0].tokens[:3] and out[0].finish_reason == "stop"
    for free_row, row in zip(free[1:], out[1:], strict=True):
        cut = free_row.tokens.index(eos) if eos in free_row.tokens else len(free_row.tokens)
        assert row.tokens == free_row.tokens[:cut]


def test_context_limit_caps_new_tokens():
    model = tiny()
    out = generate(model, [list(range(2, 120))], GenerationConfig(max_new_tokens=50))[0]
    assert len(out.tokens) == model.config.max_seq_len - 118 and out.finish_reason == "length"


def test_text_tracker_cuts_at_stop_strings_and_holds_back_prefixes():
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    tracker = TextTracker(decode, ["END"])
    emitted = [tracker.push(ord(c)) for c in "abcE"]
    assert "".join(emitted) == "abc"  # "E" could start "END": held back
    assert tracker.push(ord("x")) == "Ex"
    for c in "yEN":
        tracker.push(ord(c))
    assert not tracker.stopped
    tracker.push(ord("D"))
    assert tracker.stopped and tracker.text == "abcExy"


def test_seeded_sampling_is_reproducible():
    model = tiny()
    config = GenerationConfig(max_new_tokens=16, sampling=SamplingConfig(temperature=1.5, top_p=0.95))
    a = generate(model, PROMPTS, config, generator=torch.Generator().manual_seed(3))
    b = generate(model, PROMPTS, config, generator=torch.Generator().manual_seed(3))
    c = generate(model, PROMPTS, config, generator=torch.Generator().manual_seed(4))
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def sequence_logprob(model, prompt, tokens) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0].float().log_softmax(-1)
    return sum(logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens))


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_beam_search_finds_the_best_sequence_by_brute_force(alpha):
    V, depth, eos = 6, 3, 0
    model = tiny(seed=1, vocab_size=V)
    prompt = [1, 2, 3]
    best, best_score = None, -float("inf")
    # every hypothesis: ends with EOS after 0..depth-1 other tokens, or reaches depth tokens without EOS
    for length in range(1, depth + 1):
        for body in itertools.product(range(1, V), repeat=length - 1):
            for last in range(V):
                if length < depth and last != eos:
                    continue
                seq = list(body) + [last]
                score = sequence_logprob(model, prompt, seq) / length ** alpha
                if score > best_score:
                    best, best_score = seq, score
    config = GenerationConfig(max_new_tokens=depth, num_beams=V ** depth, length_penalty=alpha, eos_ids=[eos])
    out = beam_search(model, prompt, config)
    expected = best[:-1] if best[-1] == eos else best
    assert out.tokens == expected
    assert out.score == pytest.approx(best_score, abs=1e-4)


def test_one_beam_is_greedy():
    model = tiny()
    out = generate(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=8, num_beams=1))[0]
    beam = beam_search(model, PROMPTS[0], GenerationConfig(max_new_tokens=8, num_beams=1))
    assert beam.tokens == out.tokens


def test_contrastive_decoding_follows_its_definition():
    expert, amateur = tiny(seed=0), tiny(seed=5, n_layers=1)
    prompt, alpha = PROMPTS[0], 0.1
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            x = torch.tensor([ids])
            scores = contrastive_scores(expert(x)[:, -1], amateur(x)[:, -1], alpha)
            ids.append(int(scores.argmax()))
    out = generate(expert, [prompt, PROMPTS[1]], GenerationConfig(max_new_tokens=8, contrastive_alpha=alpha),
                   amateur=amateur)
    assert out[0].tokens == ids[len(prompt):]
    assert out[0].tokens != generate(expert, [prompt], GenerationConfig(max_new_tokens=8))[0].tokens


# ------------------------------------------------------------------------------------------ command
# In-process (typer's CliRunner): a subprocess per call would spend seconds importing torch each time.


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt")


def test_generate_command_json_and_stdin(ckpt):
    code, out, _ = glm("generate", ckpt, "HAMLET. To be", "-n", "8", "--json")
    assert code == 0
    record = json.loads(out)
    assert record["completion_tokens"] <= 8 and record["finish_reason"] in ("stop", "length")
    code, piped, _ = glm("generate", ckpt, "-n", "8", input="HAMLET. To be")
    assert code == 0 and piped.rstrip("\n") == record["completion"]


def test_generate_command_jsonl_batches_and_seed(ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                               for i, p in enumerate(["HAMLET.", "Who speaks?", "OTHELLO. Put up your"])))
    args = ["generate", ckpt, "--prompts", prompts, "-n", "6", "-t", "1.0", "--top-k", "20", "--seed", "5", "-b", "2"]
    assert glm(*args, "-o", tmp_path / "a.jsonl")[0] == 0
    assert glm(*args, "-o", tmp_path / "b.jsonl")[0] == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert all({"prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason"} <= set(r) for r in rows)


def test_generate_command_beam_chat_and_errors(ckpt):
    from glm_cli.core.errors import CheckpointError, UsageError

    code, out, _ = glm("generate", ckpt, "MACBETH.", "--num-beams", "3", "-n", "5", "--json")
    assert code == 0 and "score" in json.loads(out)
    assert glm("generate", ckpt, "Who speaks?", "--chat", "--system", "Be brief.", "-n", "5")[0] == 0
    assert isinstance(glm("generate", ckpt, "x", "--num-beams", "2", "--temperature", "1")[2], UsageError)
    assert isinstance(glm("generate", ckpt.parent / "nope", "x")[2], CheckpointError)


def test_generate_usage_error_is_one_line_exit_2(ckpt):
    bad = run_glm("generate", ckpt, "x", "--num-beams", "2", "--temperature", "1")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr.decode() and "beam search" in bad.stderr.decode()


def test_generate_with_adapter_equals_the_merged_model(ckpt, tmp_path):
    """`--adapter DIR` loads a LoRA onto the checkpoint; greedy output equals that of the merged weights."""
    from glm_cli.core.checkpoint.directory import save_checkpoint
    from glm_cli.core.load import load_model
    from glm_cli.core.tune.adapter_io import save_adapter
    from glm_cli.core.tune.peft import PeftConfig, apply_peft, merge_lora

    cfg = PeftConfig(method="lora", rank=4)
    model = apply_peft(load_model(ckpt), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    save_adapter(tmp_path / "adapter", model, cfg)
    save_checkpoint(tmp_path / "merged", merge_lora(model), tokenizer_dir=ckpt)
    with_adapter = glm("generate", ckpt, "HAMLET. To be", "-n", "8", "--adapter", tmp_path / "adapter", "--json")
    merged = glm("generate", tmp_path / "merged", "HAMLET. To be", "-n", "8", "--json")
    plain = glm("generate", ckpt, "HAMLET. To be", "-n", "8", "--json")
    assert with_adapter[0] == merged[0] == 0
    assert json.loads(with_adapter[1])["completion"] == json.loads(merged[1])["completion"]
    assert json.loads(with_adapter[1])["completion"] != json.loads(plain[1])["completion"]
