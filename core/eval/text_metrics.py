"""Reference-based metrics for generation tasks: exact match, token F1, ROUGE-L and BLEU.

Exact match and F1 follow the SQuAD v1.1 evaluation script's definitions (Rajpurkar et al. 2016): answers
are normalized (lower case, punctuation and the articles a/an/the removed, whitespace collapsed), F1 is
over the bag of normalized tokens, and a prediction scores the maximum over its reference answers.
ROUGE-L is the LCS-based F-measure of Lin (2004) with beta = 1, on normalized tokens. BLEU is corpus
BLEU (Papineni et al. 2002): clipped n-gram precisions for n = 1..4 pooled over the corpus, geometric
mean, brevity penalty against the closest reference length.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str]) -> float:
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(r) for r in references))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: list[str]) -> float:
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(r).split()) for r in references)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F1: LCS / len as precision (over the prediction) and recall (over the reference)."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for reference in references:
        ref = normalize_answer(reference).split()
        lcs = lcs_length(pred, ref)
        if lcs:
            precision, recall = lcs / len(pred), lcs / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Corpus BLEU in [0, 1] over whitespace tokens of lower-cased text (no smoothing)."""
    matches, totals = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for prediction, refs in zip(predictions, references, strict=True):
        pred = prediction.lower().split()
        ref_tokens = [r.lower().split() for r in refs]
        pred_len += len(pred)
        ref_len += min((abs(len(r) - len(pred)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(pred, n)
            max_ref = Counter()
            for r in ref_tokens:
                max_ref |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += max(len(pred) - n + 1, 0)
    if pred_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)
