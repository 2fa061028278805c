"""Conversations to token ids, with the mask of the tokens a fine-tuned model is trained to produce.

The format is `CHAT_TEMPLATE` of `glm_cli.core.tokens.tokenizer`: every message is `<|role|>\\n{content}<|end|>\\n`,
and the generation prompt is `<|assistant|>\\n`. `render()` produces exactly the ids Hugging Face's
`tokenizer.apply_chat_template(messages, tokenize=True)` does (tested), and beside them a loss mask that
is True on every assistant turn's content and its closing `<|end|>`: the model learns to answer and to
stop, on each turn of a multi-turn conversation, never to predict what the user or the system wrote.

Why this equals tokenizing the whole rendered text: the tokenizer splits its input at special tokens
before any pre-tokenization or merge, so the pieces between specials (`\\n{content}` and `\\n`) are
tokenized independently either way. The mask is taken from character offsets: a token belongs to the
response if it holds any character of the content (the leading `\\n` is part of the prompt).

Checkpoints of other models bring their own template: `glm_cli.core.tokens.chat_template` renders those with
the same interface, and `chat_encoder_for` picks between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from glm_cli.core.errors import DataError
from glm_cli.core.tokens.tokenizer import END_OF_TURN, ROLE_TOKENS

ROLES = tuple(ROLE_TOKENS)


@dataclass(slots=True)
class Rendered:
    ids: list[int]
    mask: list[bool]
    """True where the token is part of an assistant answer (content + `<|end|>`): the loss positions."""

    @property
    def n_response_tokens(self) -> int:
        return sum(self.mask)


def messages_from_record(record: dict, source: str = "<data>", line: int = 0) -> list[dict]:
    """A JSONL record as a list of messages: `{"messages": [...]}` or `{"prompt", "response"}`.

    `{"prompt", "completion"}`/`{"prompt", "chosen"}` are accepted as the response too (the same files
    serve SFT on the chosen answer of preference data). An optional `system` string is prepended.
    """
    if "messages" in record:
        messages = record["messages"]
        check_messages(messages, source, line)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(source, line, "conversation has no assistant turn to learn from")
        return messages
    response = next((record[k] for k in ("response", "completion", "chosen") if k in record), None)
    if not isinstance(record.get("prompt"), str) or not isinstance(response, str):
        raise DataError(source, line, "expected {\"messages\": [...]} or {\"prompt\": str, \"response\": str}")
    messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": response}]
    if isinstance(record.get("system"), str):
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def check_messages(messages, source: str = "<data>", line: int = 0) -> None:
    """A non-empty list of {"role", "content"} with the roles every chat format here knows."""
    if not isinstance(messages, list) or not messages:
        raise DataError(source, line, "'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(source, line, f"each message needs a role in {list(ROLES)} and a string content")


def prompt_messages(prompt: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template as a string (what `apply_chat_template(tokenize=False)` returns)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}{END_OF_TURN}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


class ChatEncoder:
    """Renders conversations with one `tokenizers.Tokenizer` (the one saved in the checkpoint)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.role_ids = {role: self._special(tok) for role, tok in ROLE_TOKENS.items()}
        self.end_id = self._special(END_OF_TURN)

    def _special(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise DataError("<tokenizer>", 0, f"tokenizer has no {token} token (train it with `glm tokenize train`)")
        return tid

    def _encode(self, text: str):
        return self.tokenizer.encode(text, add_special_tokens=False)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        ids: list[int] = []
        mask: list[bool] = []
        newline = self._encode("\n").ids
        for m in messages:
            is_answer = m["role"] == "assistant"
            ids.append(self.role_ids[m["role"]])
            mask.append(False)
            body = self._encode("\n" + m["content"])
            ids.extend(body.ids)
            # offsets are (start, end) characters of "\n" + content; a token holding any content char counts.
            mask.extend(is_answer and end > 1 for _, end in body.offsets)
            ids.append(self.end_id)
            mask.append(is_answer)
            ids.extend(newline)
            mask.extend([False] * len(newline))
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            ids.extend(newline)
            mask.extend([False] * (1 + len(newline)))
        return Rendered(ids, mask)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation so far plus the generation prompt: what `generate` feeds the model."""
        return self.render(messages, add_generation_prompt=True).ids

    def response_ids(self, response: str) -> list[int]:
        """Ids the model emits for one answer after the generation prompt: content + `<|end|>`."""
        body = self._encode("\n" + response)
        ids = [t for t, (_, end) in zip(body.ids, body.offsets, strict=True) if end > 1]
        return ids + [self.end_id]

    def prompt_and_response(self, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
        """(prompt ids incl. generation prompt, response ids incl. `<|end|>`), as rendered together.

        Rendering the full conversation and splitting at the mask keeps the ids identical to what
        `render` gives for `messages + [assistant: response]`.
        """
        full = self.render(messages + [{"role": "assistant", "content": response}])
        # full ends with <|end|> "\n": the trailing newline is not part of the response
        last = max(i for i, m in enumerate(full.mask) if m) + 1
        first = last - 1
        while first > 0 and full.mask[first - 1]:
            first -= 1
        return full.ids[:first], full.ids[first:last]
