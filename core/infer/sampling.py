"""Next-token selection: logit processors, each a small function with the definition it implements.

Every processor takes float logits (B, V) and returns new logits of the same shape (filters set removed
tokens to -inf). `LogitsPipeline` applies the configured ones in the order Hugging Face `generate` does:
penalties and biases on the raw logits first, then temperature, then the truncation filters (top-k,
top-p, min-p), then a draw. Temperature 0 means greedy (argmax), with no draw at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glm_cli.core.errors import UsageError

NEG_INF = float("-inf")


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    temperature: float = 0.0
    """0 selects the most likely token (greedy); > 0 divides the logits by it and samples."""
    top_k: int = 0
    """Keep the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of most likely tokens whose probability mass reaches p (1: off)."""
    min_p: float = 0.0
    """Keep tokens whose probability is at least min_p times the top token's (0: off)."""
    repetition_penalty: float = 1.0
    """CTRL penalty on every token already in the prompt or the output (1: off)."""
    frequency_penalty: float = 0.0
    """OpenAI: subtract count * value from a token's logit, counting generated tokens (0: off)."""
    presence_penalty: float = 0.0
    """OpenAI: subtract value once from every token generated at least once (0: off)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit at every step (-100 bans a token in practice)."""

    def validate(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if self.top_k < 0:
            problems.append("top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append("top-p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            problems.append("min-p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            problems.append("repetition penalty must be > 0")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ------------------------------------------------------------------------------------------ processors


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T): T < 1 sharpens, T > 1 flattens (Ackley, Hinton & Sejnowski 1985).

    T = 0 is the greedy limit and is handled by `select` as an argmax, never as a division.
    """
    if temperature in (0.0, 1.0):
        return logits
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row, -inf elsewhere (Fan, Lewis & Dauphin 2018).

    Ties at the k-th value are all kept (as Hugging Face's TopKLogitsWarper does).
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most probable tokens whose
    cumulative probability reaches p.

    Sorted by descending probability, token i is kept when the mass of the tokens before it is still
    below p; the top token is therefore always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    remove_sorted = mass_before >= p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): keep tokens with p(x) >= min_p * max_x' p(x')."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019) in the form Hugging Face implements it.

    For every token already present (`seen`, bool (B, V): prompt and output), a positive logit is
    divided by `penalty` and a negative one multiplied by it, so the token always becomes less likely.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                               presence: float) -> torch.Tensor:
    """OpenAI's definition: mu[j] - c[j] * frequency - (c[j] > 0) * presence.

    `counts` (B, V) holds c[j], how many times token j was generated so far (the prompt does not count).
    """
    if frequency == 0 and presence == 0:
        return logits
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def add_logit_bias(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """OpenAI's logit_bias: a fixed value (V,) added to each token's logit before sampling."""
    return logits if bias is None else logits + bias


def select(logits: torch.Tensor, greedy: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token per row (B,): argmax when greedy, else a draw from softmax(logits).

    Draws use `generator` only (never the global RNG), so a seed fixes the output.
    """
    if greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------ pipeline


class LogitsPipeline:
    """The configured processors, with the per-row token statistics the penalties need.

    `start(prompts)` records which tokens each row's prompt holds; `observe(tokens)` adds each step's
    chosen tokens; `__call__(logits)` returns processed logits (B, V) in float32.
    """

    def __init__(self, config: SamplingConfig, vocab_size: int, device):
        config.validate()
        self.config = config
        self.vocab_size = vocab_size
        self.device = device
        self.bias = None
        if config.logit_bias:
            bad = [t for t in config.logit_bias if not 0 <= t < vocab_size]
            if bad:
                raise UsageError(f"logit bias for token id(s) {bad[:5]} outside the vocabulary (0..{vocab_size - 1})")
            self.bias = torch.zeros(vocab_size, device=device)
            for token, value in config.logit_bias.items():
                self.bias[token] = float(value)
        self.track_seen = config.repetition_penalty != 1.0
        self.track_counts = config.frequency_penalty != 0 or config.presence_penalty != 0
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def start(self, prompt_ids: torch.Tensor, prompt_valid: torch.Tensor) -> None:
        """prompt_ids (B, P) with prompt_valid (B, P) False on padding."""
        batch = prompt_ids.shape[0]
        if self.track_seen:
            hits = torch.zeros(batch, self.vocab_size, dtype=torch.int32, device=self.device)
            hits.scatter_add_(1, prompt_ids, prompt_valid.to(torch.int32))
            self.seen = hits > 0
        if self.track_counts:
            self.counts = torch.zeros(batch, self.vocab_size, device=self.device)

    def observe(self, tokens: torch.Tensor) -> None:
        """Record the tokens (B,) just chosen (rows that already finished no longer matter)."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=self.counts.dtype))

    def reorder(self, index: torch.Tensor) -> None:
        """Follow a beam reordering (row i becomes old row index[i])."""
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        if self.counts is not None:
            self.counts = self.counts.index_select(0, index)

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties and bias only (what beam search and contrastive decoding use)."""
        logits = logits.float()
        if self.seen is not None:
            logits = repetition_penalty(logits, self.seen, self.config.repetition_penalty)
        if self.counts is not None:
            logits = frequency_presence_penalty(logits, self.counts, self.config.frequency_penalty,
                                                self.config.presence_penalty)
        return add_logit_bias(logits, self.bias)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = self.penalize(logits)
        c = self.config
        if c.greedy:
            return logits
        logits = apply_temperature(logits, c.temperature)
        logits = top_k_filter(logits, c.top_k)
        logits = top_p_filter(logits, c.top_p)
        return min_p_filter(logits, c.min_p)

    def next_tokens(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return select(self(logits), self.config.greedy, generator)


def contrastive_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Contrastive decoding (Li et al. 2022, "Contrastive Decoding: Open-ended Text Generation as
    Optimization"): score(x) = log p_expert(x) - log p_amateur(x) over the plausible set
    V_head = {x : p_expert(x) >= alpha * max_x' p_expert(x')}, -inf outside it.

    The plausibility constraint keeps the amateur from promoting tokens the expert finds implausible.
    """
    expert = expert_logits.float().log_softmax(-1)
    amateur = amateur_logits.float().log_softmax(-1)
    # p >= alpha * max p  <=>  log p >= log alpha + max log p
    plausible = expert >= expert.amax(-1, keepdim=True) + torch.log(torch.tensor(alpha))
    return torch.where(plausible, expert - amateur, torch.full_like(expert, NEG_INF))
