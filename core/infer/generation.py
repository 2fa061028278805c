"""Text generation with a KV cache: batched sampling, beam search and contrastive decoding.

One prefill runs the whole (left-padded) batch of prompts and fills the cache; each decode step then
feeds one token per row. Left padding keeps every row's newest token in the same column, so a step is
one (B, 1) forward. Padding is invisible to the model: pad keys are masked out of attention, and
positions count real tokens only, so a padded row computes what it would alone (tested).

Rows stop independently (end-of-sequence token, a stop string, or `max_new_tokens`); a finished row
keeps riding along in the batch until all rows are done, and its extra tokens are discarded.

The decode loop allocates nothing that grows with the step: the attention mask of a step is a view of
one preallocated (B, P + N) "valid key" table, and the cache is preallocated for P + N positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from glm_cli.core.checkpoint.directory import generation_config_eos_ids
from glm_cli.core.errors import UsageError
from glm_cli.core.infer.sampling import LogitsPipeline, SamplingConfig, contrastive_scores
from glm_cli.core.model.transformer import KVCache


@dataclass(kw_only=True, slots=True)
class GenerationConfig:
    max_new_tokens: int = 128
    """Tokens to generate at most."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation of a row ends when its text contains one; the text is cut before it."""
    eos_ids: list[int] = field(default_factory=list)
    """Token ids that end a row (not included in its text)."""
    num_beams: int = 1
    """Beam search with this many beams (1: off)."""
    length_penalty: float = 1.0
    """Beam search ranks finished hypotheses by sum(log p) / length ** length_penalty."""
    contrastive_alpha: float = 0.1
    """Plausibility threshold of contrastive decoding (used only with an amateur model)."""

    def validate(self) -> None:
        self.sampling.validate()
        if self.max_new_tokens < 1:
            raise UsageError("max new tokens must be >= 1")
        if self.num_beams < 1:
            raise UsageError("num beams must be >= 1")
        if self.num_beams > 1 and not self.sampling.greedy:
            raise UsageError("beam search is deterministic: use it with temperature 0")
        if not 0 <= self.contrastive_alpha <= 1:
            raise UsageError("contrastive alpha must be in [0, 1]")


@dataclass(slots=True)
class Completion:
    tokens: list[int]
    """Generated ids, without the end-of-sequence token."""
    text: str
    prompt_tokens: int
    finish_reason: str
    """'stop' (end-of-sequence token or stop string) or 'length' (max new tokens or context full)."""
    score: float | None = None
    """Beam search only: the length-normalized log-probability of the chosen hypothesis."""

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class TextTracker:
    """A row's generated text as tokens arrive: finds stop strings and yields only text that is final.

    Text is held back while it ends in an incomplete UTF-8 character or could still become a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; returns the newly final text (possibly empty)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        safe = len(text)
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, self.emitted - longest)
        cuts = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
        if cuts:
            text, safe, self.stopped = text[:min(cuts)], min(cuts), True
        else:
            while safe > self.emitted and text[safe - 1] == "\ufffd":
                safe -= 1
            for n in range(min(longest - 1, safe - self.emitted), 0, -1):
                if any(s.startswith(text[safe - n:safe]) for s in self.stop):
                    safe -= n
                    break
        self.text = text
        delta = text[self.emitted:safe]
        self.emitted = safe
        return delta

    def flush(self) -> str:
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta


def eos_ids_for(model_config, tokenizer=None, checkpoint_dir=None) -> list[int]:
    """Ids that end a completion: every end-of-sequence id the model declares, and glm's own.

    Chat models end a turn with a token other than their document end (Llama 3's `<|eot_id|>`, ChatML's
    `<|im_end|>`) and list it only in generation_config.json, so that file of `checkpoint_dir` counts
    beside config.json. glm's `<|endoftext|>` and end-of-turn `<|end|>` count when the tokenizer has them.
    """
    from glm_cli.core.tokens.tokenizer import END_OF_TURN, ENDOFTEXT

    ids = [*getattr(model_config, "eos_token_ids", ()), model_config.eos_token_id]
    if checkpoint_dir is not None:
        ids += generation_config_eos_ids(checkpoint_dir)
    if tokenizer is not None:
        ids += [tokenizer.token_to_id(t) for t in (ENDOFTEXT, END_OF_TURN)]
    return sorted({i for i in ids if i is not None})


def _decoder(tokenizer) -> Callable[[list[int]], str]:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _budget(model, prompt_len: int, max_new_tokens: int) -> int:
    context = model.config.max_seq_len
    if prompt_len >= context:
        raise UsageError(f"prompt has {prompt_len} tokens; the model's context is {context}")
    return min(max_new_tokens, context - prompt_len)


def left_pad(prompts: list[list[int]], pad_id: int, total: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, P) left-padded, and valid (B, total) bool: True on real prompt tokens and on P..total."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    valid = torch.ones(len(prompts), total, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[row, :longest - len(prompt)] = False
    return ids.to(device), valid.to(device)


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, P, P) bool: causal, never attending to padding; a pad query attends to itself only (so
    no attention row is empty, which would produce NaN)."""
    P = valid.shape[1]
    causal = torch.ones(P, P, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(P, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def last_logits(model, ids: torch.Tensor, positions, mask, cache) -> torch.Tensor:
    """Prefill: run the prompt through the model, the output head only on the last position (B, V)."""
    h = model.hidden_states(model.embed(ids), positions, mask, cache)
    return model.lm_head(h[:, -1])


@torch.inference_mode()
def generate(model, prompts: list[list[int]], config: GenerationConfig, *, tokenizer=None, amateur=None,
             on_text: Callable[[int, str], None] | None = None,
             generator: torch.Generator | None = None) -> list[Completion]:
    """Complete each prompt (a list of token ids); returns one `Completion` per prompt, in order.

    on_text(row, text) receives each row's text as it becomes final (streaming). `amateur` switches to
    contrastive decoding. `tokenizer` (a `tokenizers.Tokenizer`) is needed for text and stop strings.
    """
    config.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    if config.num_beams > 1:
        if amateur is not None:
            raise UsageError("use either beam search or contrastive decoding, not both")
        return [beam_search(model, p, config, tokenizer=tokenizer) for p in prompts]
    if amateur is not None and amateur.config.vocab_size != model.config.vocab_size:
        raise UsageError(f"the amateur's vocabulary ({amateur.config.vocab_size}) differs from the model's "
                         f"({model.config.vocab_size}); contrastive decoding needs the same tokenizer")

    device = next(model.parameters()).device
    B, lengths = len(prompts), [len(p) for p in prompts]
    P = max(lengths)
    N = _budget(model, P, config.max_new_tokens)
    if amateur is not None:
        N = _budget(amateur, P, N)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, valid = left_pad(prompts, pad_id, P + N, device)
    padded = min(lengths) != P
    positions = (valid[:, :P].long().cumsum(1) - 1).clamp(min=0)  # (B, P): real tokens count from 0
    mask = prefill_mask(valid[:, :P]) if padded else None

    models = [model] if amateur is None else [model, amateur]
    caches = [KVCache(m.config, B, P + N, device, next(m.parameters()).dtype) for m in models]
    logits = [last_logits(m, ids, positions, mask, c) for m, c in zip(models, caches, strict=True)]

    pipeline = LogitsPipeline(config.sampling, model.config.vocab_size, device)
    pipeline.start(ids, valid[:, :P])
    eos = torch.tensor(config.eos_ids or [-1], device=device)
    out = torch.empty(B, N, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    n_generated = torch.zeros(B, dtype=torch.long, device=device)  # tokens kept per row (EOS excluded)
    hit_eos = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = torch.tensor(lengths, device=device)[:, None]  # (B, 1)
    decode = _decoder(tokenizer) if tokenizer is not None else None
    trackers = None
    if config.stop or on_text is not None:
        if decode is None:
            raise UsageError("stop strings and streaming need the tokenizer")
        trackers = [TextTracker(decode, config.stop) for _ in range(B)]

    steps = 0
    for step in range(N):
        scores = logits[0] if amateur is None else contrastive_scores(logits[0], logits[1], config.contrastive_alpha)
        token = pipeline.next_tokens(scores, generator)  # (B,)
        token = token.masked_fill(finished, pad_id)
        out[:, step] = token
        steps = step + 1
        pipeline.observe(token)
        is_eos = (token[:, None] == eos).any(-1) & ~finished
        hit_eos |= is_eos
        n_generated += (~finished & ~is_eos).long()
        finished |= is_eos
        if trackers is not None:
            for row, tok in enumerate(token.tolist()):
                tracker = trackers[row]
                if tracker.stopped or hit_eos[row]:
                    continue
                delta = tracker.push(tok)
                if tracker.stopped:
                    finished[row] = True
                if on_text is not None and delta:
                    on_text(row, delta)
        if step == N - 1 or bool(finished.all()):
            break
        step_mask = valid[:, None, None, :P + step + 1] if padded else None
        logits = [m(token[:, None], positions=next_pos, mask=step_mask, cache=c)[:, -1]
                  for m, c in zip(models, caches, strict=True)]
        next_pos = next_pos + 1

    out_rows = out[:, :steps].tolist()
    kept = n_generated.tolist()
    completions = []
    for row in range(B):
        tokens = out_rows[row][:kept[row]]
        if trackers is not None:
            tracker = trackers[row]
            if on_text is not None:
                rest = tracker.flush()
                if rest:
                    on_text(row, rest)
            text, stopped = tracker.text, tracker.stopped
            tokens = tokens[:len(tracker.ids)] if stopped else tokens
        else:
            text, stopped = (decode(tokens) if decode else ""), False
        reason = "stop" if (stopped or bool(hit_eos[row])) else "length"
        completions.append(Completion(tokens=tokens, text=text, prompt_tokens=lengths[row], finish_reason=reason))
    return completions


# ------------------------------------------------------------------------------------------ beam search


@torch.inference_mode()
def beam_search(model, prompt: list[int], config: GenerationConfig, *, tokenizer=None) -> Completion:
    """Beam search with Hugging Face's length penalty: a finished hypothesis scores
    sum(log p) / L ** length_penalty, L its number of generated tokens (an end-of-sequence token counts).

    Each step extends every beam by every token, keeps the 2K best candidates (K = num_beams): an
    end-of-sequence candidate ranked among the first K becomes a finished hypothesis, the best K others
    continue. The search stops when K hypotheses are finished and no running beam can still beat the
    worst of them (the exact bound, Hugging Face's `early_stopping="never"`), or at max new tokens,
    where the running beams are finished as they are. Cache rows follow the beams via `KVCache.reorder`.
    """
    device = next(model.parameters()).device
    K, alpha = config.num_beams, config.length_penalty
    N = _budget(model, len(prompt), config.max_new_tokens)
    eos = set(config.eos_ids)
    cache = KVCache(model.config, 1, len(prompt) + N, device, next(model.parameters()).dtype)
    ids = torch.tensor([prompt], device=device)
    logits = last_logits(model, ids, None, None, cache)
    pipeline = LogitsPipeline(config.sampling, model.config.vocab_size, device)
    pipeline.start(ids, torch.ones_like(ids, dtype=torch.bool))
    beams: list[list[int]] = [[]]
    beam_scores = torch.zeros(1, device=device)
    finished: list[tuple[float, list[int], bool]] = []  # (normalized score, tokens, ended with EOS)

    def add_finished(score: float, tokens: list[int], ended: bool) -> None:
        finished.append((score, tokens, ended))
        finished.sort(key=lambda h: h[0], reverse=True)
        del finished[K:]

    for step in range(N):
        logprobs = pipeline.penalize(logits).log_softmax(-1)  # (R, V)
        scores = (beam_scores[:, None] + logprobs).view(-1)
        V = logprobs.shape[-1]
        top = torch.topk(scores, min(2 * K, scores.numel()))
        length = step + 1
        next_rows, next_tokens, next_scores = [], [], []
        for rank, (value, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            row, token = divmod(flat, V)
            if token in eos:
                if rank < K:
                    add_finished(value / length ** alpha, beams[row] + [token], True)
                continue
            next_rows.append(row)
            next_tokens.append(token)
            next_scores.append(value)
            if len(next_rows) == K:
                break
        if not next_rows:
            break
        beams = [beams[r] + [t] for r, t in zip(next_rows, next_tokens, strict=True)]
        beam_scores = torch.tensor(next_scores, device=device)
        if step == N - 1:
            for tokens, s in zip(beams, next_scores, strict=True):
                add_finished(s / length ** alpha, tokens, False)
            break
        if len(finished) == K:
            best = max(next_scores)
            bound = best / (N ** alpha if alpha > 0 else (length + 1) ** alpha)
            if finished[-1][0] >= bound:
                break
        index = torch.tensor(next_rows, device=device)
        cache.reorder(index)
        pipeline.reorder(index)
        token_tensor = torch.tensor(next_tokens, device=device)
        pipeline.observe(token_tensor)
        logits = model(token_tensor[:, None], cache=cache)[:, -1]

    score, tokens, ended = finished[0]
    if ended:
        tokens = tokens[:-1]
    decode = _decoder(tokenizer) if tokenizer is not None else None
    text = decode(tokens) if decode else ""
    reason = "stop" if ended else "length"
    cut = [i for i in (text.find(s) for s in config.stop if s) if i >= 0]
    if cut:
        text, reason = text[:min(cut)], "stop"
    return Completion(tokens=tokens, text=text, prompt_tokens=len(prompt), finish_reason=reason, score=score)
