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

# The chat format, as the Jinja template HF `apply_chat_template` runs. `glm_cli.core.chat` renders the
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
    from glm_cli.core.atomic import write_text_atomic

    write_text_atomic(Path(directory) / "tokenizer_config.json",
                      json.dumps(hf_tokenizer_config(model_max_length), indent=2) + "\n")
