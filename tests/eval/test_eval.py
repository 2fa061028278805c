"""Evaluation: lm-eval's windows and pair encoding, perplexity against a direct computation, batch-size
invariance, metrics on hand examples, few-shot determinism, and the `glm eval` table/report."""

import json
import math

import pytest
import torch
from eval_fixtures import make_checkpoint

from glm_cli.core.eval.tasks import Scorer, evaluate_task, fewshot_prefix, load_task, rolling_windows
from glm_cli.core.eval.text_metrics import corpus_bleu, exact_match, normalize_answer, rouge_l, token_f1
from glm_cli.core.load import load_model
from glm_cli.core.tokens.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only add contention


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    mc = [{"context": f"Line {i}: To be, or not to be. Who speaks? ", "choices": ["HAMLET", "MACBETH", "Lady Macbeth"],
           "gold": i % 3} for i in range(12)]
    mc += [{"context": "", "choices": ["OTHELLO. Put up", "OPHELIA. Good my lord"], "gold": 1}]
    gen = [{"prompt": f"Q{i}: Which play? ", "answers": ["Macbeth", "The Tragedy of Macbeth"]} for i in range(6)]
    long_text = "HAMLET. To be, or not to be, that is the question. " * 40  # longer than the 128 context
    ppl = [{"text": long_text}, {"text": "OTHELLO. Put up your bright swords."}]
    for name, records in [("mc", mc), ("gen", gen), ("ppl", ppl)]:
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def scorer_for(ckpt, batch_size=16, max_length=0):
    return Scorer(load_model(ckpt), load_tokenizer(ckpt), max_length=max_length, batch_size=batch_size)


def test_rolling_windows_match_lm_eval_by_hand():
    tokens = list(range(1, 11))
    assert rolling_windows(tokens, 0, 4) == [([0], [1, 2, 3, 4]), ([4], [5, 6, 7, 8]), ([6, 7, 8], [9, 10])]
    # a smaller stride predicts fewer new tokens per window, each with more context
    windows = rolling_windows(tokens, 0, 4, stride=2)
    assert [w[1] for w in windows] == [[1, 2, 3, 4], [5, 6], [7, 8], [9, 10]]
    assert windows[1] == ([2, 3, 4], [5, 6])
    for max_length in (3, 7):
        for stride in range(1, max_length + 1):
            windows = rolling_windows(tokens, 0, max_length, stride)
            assert sum((w[1] for w in windows), []) == tokens  # every token predicted exactly once
            assert all(len(c) + len(p) - 1 <= max_length for c, p in windows)


def test_encode_pair_moves_trailing_spaces_like_lm_eval(ckpt):
    scorer = scorer_for(ckpt)
    context, continuation = scorer.encode_pair("Who speaks? ", "HAMLET")
    whole = scorer.encode("Who speaks? HAMLET")
    assert context == scorer.encode("Who speaks?") and context + continuation == whole
    assert scorer.encode_pair("", "HAMLET") == ([0], scorer.encode("HAMLET"))


def test_perplexity_equals_a_direct_computation(ckpt, tmp_path):
    text = "OTHELLO. Put up your bright swords, for the dew will rust them."
    (tmp_path / "doc.txt").write_text(text)
    scorer = scorer_for(ckpt)
    result = evaluate_task(scorer, load_task(str(tmp_path / "doc.txt")))
    ids = [0] + scorer.encode(text)
    with torch.no_grad():
        logits = scorer.model(torch.tensor([ids[:-1]]))[0]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    m = result["metrics"]
    assert m["cross_entropy"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(nll / (len(text.encode()) * math.log(2)), rel=1e-5)
    assert m["word_perplexity"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-4)


@pytest.mark.parametrize("kind", ["mc", "ppl", "gen"])
def test_scores_do_not_depend_on_batch_size(ckpt, tasks, kind):
    task = load_task(str(tasks / f"{kind}.jsonl"))
    one = evaluate_task(scorer_for(ckpt, batch_size=1), task, stride=32)
    many = evaluate_task(scorer_for(ckpt, batch_size=32), task, stride=32)
    for key, value in one["metrics"].items():
        assert many["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    if kind == "mc":
        for a, b in zip(one["predictions"], many["predictions"], strict=True):
            assert a["lls"] == pytest.approx(b["lls"], abs=1e-4)
            assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
    if kind == "gen":
        assert one["predictions"] == many["predictions"]


def test_multiple_choice_accuracy_definitions(ckpt, tasks):
    scorer = scorer_for(ckpt)
    task = load_task(str(tasks / "mc.jsonl"))
    result = evaluate_task(scorer, task)
    acc = acc_norm = 0
    for record, pred in zip(task.records, result["predictions"], strict=True):
        lls = [scorer.loglikelihoods([scorer.encode_pair(record["context"], c)])[0][0] for c in record["choices"]]
        assert lls == pytest.approx(pred["lls"], abs=1e-4)
        acc += max(range(len(lls)), key=lls.__getitem__) == record["gold"]
        norm = [ll / len(c) for ll, c in zip(lls, record["choices"], strict=True)]
        acc_norm += max(range(len(lls)), key=norm.__getitem__) == record["gold"]
    assert result["metrics"]["acc"] == pytest.approx(acc / len(task.records))
    assert result["metrics"]["acc_norm"] == pytest.approx(acc_norm / len(task.records))


def test_generation_metrics_on_hand_examples():
    assert normalize_answer("The  Tragedy of Macbeth!") == "tragedy of macbeth"
    assert exact_match("the Macbeth.", ["Macbeth"]) == 1.0
    assert exact_match("Macbeth's wife", ["Macbeth"]) == 0.0
    assert token_f1("lady macbeth speaks", ["Macbeth"]) == pytest.approx(0.5)  # p 1/3, r 1
    assert token_f1("hamlet", ["Othello", "Hamlet"]) == 1.0
    assert rouge_l("to be or not to be", ["to be or to not be"]) == pytest.approx(5 / 6)  # LCS 5 of 6
    assert corpus_bleu(["to be or not to be"], [["to be or not to be"]]) == pytest.approx(1.0)
    # 4 tokens vs 6-token reference: all n-grams match, brevity penalty exp(1 - 6/4)
    assert corpus_bleu(["to be or not"], [["to be or not to be"]]) == pytest.approx(math.exp(1 - 6 / 4))
    assert corpus_bleu(["nothing alike here"], [["to be or not to be"]]) == 0.0


def test_fewshot_draw_is_seeded_and_excludes_the_item():
    pool = [{"prompt": f"Q{i}? ", "answers": [f"A{i}"]} for i in range(5)]
    a = fewshot_prefix(pool, "gen", 2, seed=1, index=0, exclude=pool[0])
    assert a == fewshot_prefix(pool, "gen", 2, seed=1, index=0, exclude=pool[0])
    assert "Q0?" not in a and a.count("\n\n") == 2
    assert len({fewshot_prefix(pool, "gen", 2, seed=s, index=0, exclude=pool[0]) for s in range(10)}) > 1


def test_eval_command_compares_checkpoints(ckpt, tasks, tmp_path):
    from typer.testing import CliRunner

    from glm_cli.app import app

    other = make_checkpoint(tmp_path / "other", seed=3)
    args = ["eval", str(ckpt), str(other), "--task", str(tasks / "mc.jsonl"), "--task", str(tasks / "ppl.jsonl"),
            "--task", str(tasks / "gen.jsonl"), "-b", "4"]
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.stdout
    assert "acc_norm" in table.stdout and "perplexity" in table.stdout and "rouge_l" in table.stdout
    report = CliRunner().invoke(app, args + ["--json", "-o", str(tmp_path / "r.json")])
    data = json.loads(report.stdout)
    assert set(data["results"]) == {str(ckpt), str(other)}
    assert data == json.loads((tmp_path / "r.json").read_text())
    assert data["results"][str(ckpt)]["mc"]["n"] == 13
