"""Conversations to ids and a loss mask with the model's own Jinja chat template (SmolLM2, Llama 3, Qwen2,
Mistral ...), and the choice between that and glm's own format.

A pretrained chat model was trained on one exact text layout; prompting or fine-tuning it with another
wastes what it learned. So glm renders the template the checkpoint ships, the way `transformers` does:
the same sandboxed Jinja settings, the same variables, then the whole text tokenized in one pass
without the tokenizer's post-processor. The ids equal `tokenizer.apply_chat_template(messages)` (tested
on ChatML, Llama 3 and Mistral templates).

The loss mask cannot be read off the template (it is arbitrary code), so it is found by rendering
prefixes of the conversation: for assistant message i, `messages[:i]` with the generation prompt ends
where the answer starts, and `messages[:i+1]` ends where the turn ends. Both must be prefixes of the
whole rendering; a template for which they are not (one that rewrites earlier turns depending on later
ones) is refused for training rather than masked by guesswork. Tokens overlapping an answer's
characters are its tokens, as in `transformers`' assistant mask.

A turn is the content plus the end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `</s>`): the model
learns to answer and to stop. Whitespace a template writes after that marker (ChatML's "\\n") is
left out of the mask when the turn, stripped of it, ends with an added token: the model never has
to produce it, because generation stops at the marker. Without such a token nothing is trimmed.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from glm_cli.core.errors import CheckpointError, DataError
from glm_cli.core.tokens.chat import ROLES, ChatEncoder, Rendered

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SOURCE = "<chat template>"
"""Where a template came from when not from a file. Rendering errors name the template's file; data
loaders relabel them with the file:line of the conversation."""


# ------------------------------------------------------------------------------------------ Jinja


@lru_cache(maxsize=1)
def _environment():
    """Chat templates come from downloaded checkpoints: untrusted code, so they run sandboxed, with the
    helpers and whitespace handling that templates written for `transformers` rely on."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks answers for transformers' own mask; the
        # prefix renders find those spans anyway, so here the tag only has to render its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    class Namespace(jinja2.utils.Namespace):
        # `namespace()` objects are writable: refuse underscore names, the way into Python internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, > and & for HTML, which would change the text the model saw.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    return env


def compile_template(template: str, origin: str = SOURCE):
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"{origin}: the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


# ------------------------------------------------------------------------------------------ checkpoint files


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_chat_template(directory: str | Path) -> tuple[str | None, str]:
    """(template or None, where it was found). chat_template.jinja wins over tokenizer_config.json, as
    in `transformers`; a list of named templates there contributes its "default"."""
    directory = Path(directory)
    file = directory / TEMPLATE_FILE
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8"), str(file)
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: cannot read the chat template ({e})") from None
    config_path = directory / TOKENIZER_CONFIG
    if not config_path.is_file():
        return None, str(config_path)
    value = _read_json(config_path).get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise CheckpointError(f"{config_path}: chat_template lists {sorted(map(str, named))} but no "
                                  "'default' template")
        value = named["default"]
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{config_path}: chat_template must be a string or a list of "
                              "{\"name\", \"template\"} objects")
    return value or None, str(config_path)


def _token_text(value) -> str | None:
    """A special-token entry as text: "<s>", or the serialized AddedToken {"content": "<s>", ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def template_variables(directory: str | Path) -> dict[str, str]:
    """The special tokens a template can use by name (bos_token, eos_token, ...): every `*_token` entry
    of tokenizer_config.json (its `extra_special_tokens` mapping too).

    special_tokens_map.json, the older file, counts the way `transformers` reads it: its entries
    override the config's, unless the config lists its tokens itself (`added_tokens_decoder`).
    """
    directory = Path(directory)
    config_path, map_path = directory / TOKENIZER_CONFIG, directory / SPECIAL_TOKENS_MAP
    config = _read_json(config_path) if config_path.is_file() else {}
    sources = [config]
    if "added_tokens_decoder" not in config and map_path.is_file():
        sources.append(_read_json(map_path))
    variables: dict[str, str] = {}
    for data in sources:
        extra = data.get("extra_special_tokens")
        for key, value in {**(extra if isinstance(extra, dict) else {}), **data}.items():
            text = _token_text(value)
            if key.endswith("_token") and text is not None:
                variables[key] = text
    return variables


# ------------------------------------------------------------------------------------------ the encoder


class TemplateChatEncoder:
    """`ChatEncoder`'s interface over the model's own template and its `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer, template: str, variables: dict[str, str] | None = None, origin: str = SOURCE):
        self.tokenizer = tokenizer
        self.origin = origin
        self.template = compile_template(template, origin)
        self.variables = dict(variables or {})
        # `transformers` tokenizes the rendering with add_special_tokens=False, where no post-processor
        # changes an id; but some (ByteLevel with trim_offsets) shrink the offsets of space tokens to
        # nothing, which would drop them from the mask. Without the post-processor they stay whole.
        self._plain = tokenizer
        if tokenizer.post_processor is not None:
            from tokenizers import Tokenizer

            self._plain = Tokenizer.from_str(tokenizer.to_str())
            self._plain.post_processor = None
        self._added = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.content.strip()]

    # ------------------------------------------------------------------ rendering

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text (what `apply_chat_template(tokenize=False)` returns)."""
        import jinja2

        chat = [dict(m) for m in messages]
        try:
            return self.template.render(messages=chat, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.variables)
        except jinja2.TemplateError as e:
            raise DataError(self.origin, 0, f"the model's chat template rejects this conversation: {e}") from None

    def _check(self, messages: list[dict]) -> None:
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(self.origin, 0, f"each message needs a role in {list(ROLES)} and a string content")

    def _answer_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Character span of each assistant turn in `text` (the rendering of all of `messages`)."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.render_text(messages[:i], add_generation_prompt=True)
            turn = self.render_text(messages[:i + 1])
            if not (text.startswith(head) and text.startswith(turn) and len(head) <= len(turn)):
                raise DataError(self.origin, 0, f"the model's chat template renders a conversation "
                                f"differently from its first {i} or {i + 1} messages, so glm cannot tell which "
                                "tokens are the assistant's: it can't be used for loss masking")
            start, end = len(head), len(turn)
            stripped = text[start:end].rstrip()
            if any(stripped.endswith(t) for t in self._added):
                end = start + len(stripped)
            spans.append((start, end))
        return spans

    def _encode(self, messages: list[dict], add_generation_prompt: bool):
        """(ids, token range [first, last) of each assistant turn)."""
        self._check(messages)
        text = self.render_text(messages, add_generation_prompt)
        spans = self._answer_spans(messages, text)
        encoding = self._plain.encode(text, add_special_tokens=False)
        ranges = []
        for start, end in spans:
            inside = [i for i, (a, b) in enumerate(encoding.offsets)
                      if a < end and (b > start or (a == b and a >= start))]
            if inside:
                ranges.append((inside[0], inside[-1] + 1))
            else:  # an empty turn: a zero-length range where it would start
                at = next((i for i, (a, _) in enumerate(encoding.offsets) if a >= start), len(encoding.ids))
                ranges.append((at, at))
        return encoding.ids, ranges

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        ids, ranges = self._encode(messages, add_generation_prompt)
        mask = [False] * len(ids)
        for first, last in ranges:
            mask[first:last] = [True] * (last - first)
        return Rendered(ids, mask)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation so far plus the generation prompt: what `generate` feeds the model.

        No mask is needed here, so no prefix check: templates that rewrite earlier turns (dropping old
        reasoning, say) still serve for generation."""
        self._check(messages)
        text = self.render_text(messages, add_generation_prompt=True)
        return self._plain.encode(text, add_special_tokens=False).ids

    def prompt_and_response(self, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids incl. the end-of-turn marker), split from one rendering of the whole
        conversation so that together they are exactly what `render` gives."""
        ids, ranges = self._encode(messages + [{"role": "assistant", "content": response}], False)
        first, last = ranges[-1]
        return ids[:first], ids[first:last]

    def response_ids(self, response: str) -> list[int]:
        """Ids the model emits for one answer after the generation prompt: content + end-of-turn marker.

        A template renders an answer only inside a conversation, so it is taken from a one-question one."""
        return self.prompt_and_response([{"role": "user", "content": "?"}], response)[1]

    @property
    def end_id(self) -> int | None:
        """The end-of-turn token (what an empty answer consists of), or None if that is not one added token."""
        ids = self.response_ids("")
        if len(ids) == 1 and self.tokenizer.id_to_token(ids[0]) in self._added:
            return ids[0]
        return None


# ------------------------------------------------------------------------------------------ the choice


def chat_encoder_for(checkpoint_dir: str | Path | None, tokenizer):
    """glm's `ChatEncoder` for glm's format, the model's template otherwise.

    glm's format is chosen when the checkpoint's template is glm's own `CHAT_TEMPLATE`, or when there is
    no template but the tokenizer has glm's role tokens (checkpoints older than tokenizer_config.json).
    """
    from glm_cli.core.tokens.tokenizer import CHAT_TEMPLATE, ROLE_TOKENS

    template, where = read_chat_template(checkpoint_dir) if checkpoint_dir is not None else (None, "")
    has_glm_roles = all(tokenizer.token_to_id(t) is not None for t in ROLE_TOKENS.values())
    if template == CHAT_TEMPLATE or (template is None and has_glm_roles):
        return ChatEncoder(tokenizer)
    if template is None:
        place = checkpoint_dir if checkpoint_dir is not None else "the tokenizer"
        raise CheckpointError(f"{place}: no chat template (neither {TEMPLATE_FILE} nor a chat_template in "
                              f"{TOKENIZER_CONFIG}), and glm's own chat format needs a tokenizer from "
                              "`glm tokenize train`")
    return TemplateChatEncoder(tokenizer, template, template_variables(checkpoint_dir), origin=where)
