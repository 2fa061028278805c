"""The step contract (`core.steps`) as `glm clean` uses it: a new filter is one class and one line."""

import pickle
from collections import Counter
from dataclasses import dataclass

from glm_cli.core.clean import steps as clean_steps
from glm_cli.core.clean.pipeline import CleanConfig, CleanStats, clean_batch, clean_document
from glm_cli.core.io.corpus import Document
from glm_cli.core.steps import Drop, run_batch, run_steps

PROSE = ("The history of the town is long and it has seen many changes over the years. People came to "
         "the valley to farm and to trade, and the river brought them goods from the coast. In the old "
         "days the market was held on the square in front of the church, and farmers would walk for "
         "hours to sell what they had grown. Later a railway was built, and with it came new houses, "
         "schools and a hospital that still serves the people of the region today.")


@dataclass(frozen=True, slots=True)
class NoShouting:
    """The example of `core/clean/steps.py`'s docstring, plus a counter of the documents it looked at."""

    name = "no_shouting"

    def apply(self, draft, counts):
        counts["no_shouting.checked"] += 1
        return Drop("no_shouting.upper") if draft.doc.text.isupper() else draft


def _docs():
    return [Document("calm", PROSE), Document("loud", PROSE.upper()), Document("empty", "  \n ")]


def test_a_new_filter_is_one_class_and_one_line():
    steps = CleanConfig().pipeline()
    steps.insert(steps.index(clean_steps.DropEmpty()) + 1, NoShouting())  # the one line
    stats = CleanStats()
    for result in clean_batch(steps, _docs()):
        stats.add(result)
    summary = stats.to_dict()
    assert summary["docs_in"] == 3 and summary["docs_out"] == 1
    assert summary["dropped_by_reason"] == {"empty": 1, "no_shouting.upper": 1}
    assert summary["changes"]["no_shouting.checked"] == 2  # the empty document never reached it
    # without the step the loud document is kept: it is the new step that drops it
    assert [r.reason for r in clean_batch(CleanConfig(), _docs())] == [None, None, "empty"]
    # a list of steps travels to worker processes as the config does
    assert pickle.loads(pickle.dumps(steps)) == steps


def test_config_switches_are_steps_and_reports_keep_their_names():
    config = CleanConfig()
    assert config.steps() == ["html", "normalize", "gutenberg", "navigation_lines", "c4_lines", "language",
                              "gopher_quality", "c4", "gopher_repetition", "pii"]
    names = [step.name for step in config.pipeline()]
    assert names.index("squeeze_blank_lines") < names.index("empty") < names.index("language")
    off = CleanConfig(html="never", normalize=None, language=None, pii=None, c4=None)
    assert off.steps() == ["gutenberg", "navigation_lines", "c4_lines", "gopher_quality", "gopher_repetition"]
    assert "squeeze_blank_lines" not in [step.name for step in off.pipeline()]


def test_a_dropped_document_carries_the_text_its_rule_saw():
    doc = Document("p", "<p>Too short.</p>", source="page.html")
    result = clean_document(CleanConfig(), doc)
    assert result.reason == "gopher_quality.word_count" and result.doc.text == "Too short."
    assert result.changes["html.converted"] == 1 and result.bytes_out == 0


@dataclass(frozen=True, slots=True)
class AppendMark:
    name = "mark"

    def apply(self, text, counts):
        counts["mark"] += 1
        return text + "!"


@dataclass(frozen=True, slots=True)
class DropLong:
    name = "long"
    limit: int

    def apply(self, text, counts):
        return Drop("long") if len(text) > self.limit else text


@dataclass(frozen=True, slots=True)
class BatchedUpper:
    """A step with `apply_batch`: the batch runner must use it and get what `apply` would give."""

    name = "upper"

    def apply(self, text, counts):
        return text.upper()

    def apply_batch(self, texts, counts):
        counts["upper.batches"] += 1
        return [t.upper() for t in texts]


def test_batch_runner_matches_the_per_document_runner():
    steps = [AppendMark(), DropLong(3), BatchedUpper(), AppendMark()]
    texts = ["a", "abc", "ab", ""]
    one: Counter = Counter()
    singly = [run_steps(steps, t, one) for t in texts]
    many: Counter = Counter()
    assert run_batch(steps, texts, many) == singly == ["A!!", Drop("long"), "AB!!", "!!"]
    assert one["mark"] == many["mark"] == 7 and many["upper.batches"] == 1
    assert run_batch(steps, [], Counter()) == []
