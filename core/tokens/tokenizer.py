"""glm's tokenizer conventions: special tokens, the chat template, loading and hashing.

Every glm tokenizer is a Hugging Face `tokenizers` byte-level BPE saved as `tokenizer.json`, with the
special tokens below at fixed ids 0..5, so data, models and templates agree without looking anything
up. `<|endoftext|>` separates documents and doubles as BOS and EOS.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from glm_cli.core.errors import GlmError

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# The chat format, as the Jinja template HF `apply_chat_template` runs. `glm_cli.core.tokens.chat` renders the
# same text in Python (and knows which characters are the assistant's, for loss masking).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def tokenizer_path(path: str | Path) -> Path:
    """Accept a tokenizer.json, or a directory (e.g. a checkpoint) that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise GlmError(f"{path}: no tokenizer.json (train one with `glm tokenize train`)")
    return path


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = tokenizer_path(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise GlmError(f"{path}: not a valid tokenizer.json ({e})") from None


def tokenizer_sha256(path: str | Path) -> str:
    return hashlib.sha256(tokenizer_path(path).read_bytes()).hexdigest()


def hf_tokenizer_config(model_max_length: int = 2048) -> dict:
    """tokenizer_config.json for `transformers.AutoTokenizer`, carrying the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }


def write_hf_tokenizer_config(directory: str | Path, model_max_length: int = 2048) -> None:
    from glm_cli.core.io.atomic import write_text_atomic

    write_text_atomic(Path(directory) / "tokenizer_config.json",
                      json.dumps(hf_tokenizer_config(model_max_length), indent=2) + "\n")


# ------------------------------------------------------------------------------------------ training


def new_byte_level_bpe():
    """An untrained byte-level BPE: GPT-2 pre-tokenization regex, no normalizer, no prefix space.

    Byte-level pieces cover every byte, so any valid Unicode text encodes without an unknown token and
    decodes back to itself exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


MIN_VOCAB = len(SPECIAL_TOKENS) + 256


def train_bpe(texts, vocab_size: int, min_frequency: int = 2, length: int | None = None):
    """Train a byte-level BPE on an iterator of strings; special tokens get ids 0..5, bytes 6..261."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise GlmError(f"--vocab-size {vocab_size}: needs at least {MIN_VOCAB} "
                       f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=length)
    for expected, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected:  # pragma: no cover (tokenizers keeps the given order)
            raise GlmError(f"special token {token} did not get id {expected}")
    return tok


def save_tokenizer_dir(tok, directory: str | Path, model_max_length: int = 2048) -> None:
    """`tokenizer.json` + `tokenizer_config.json`, loadable by `tokenizers` and `transformers` as they are."""
    from glm_cli.core.io.atomic import write_text_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / "tokenizer.json", tok.to_str(pretty=True))
    write_hf_tokenizer_config(directory, model_max_length)
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": PAD,
               "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END_OF_TURN]}
    write_text_atomic(directory / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def encode_texts(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, special-token strings inside the text encoded as plain text.

    So a document that happens to contain "<|endoftext|>" cannot end itself early in the shards, and
    decode(encode(text)) == text holds for every text.
    """
    tok.encode_special_tokens = True
    try:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = False


def decode_ids(tok, ids) -> str:
    return tok.decode(list(map(int, ids)), skip_special_tokens=False)
