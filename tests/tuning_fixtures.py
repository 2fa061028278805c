"""Small things the finetune and align tests share: a tokenizer and a tiny base checkpoint made on the spot."""

import json
from pathlib import Path

import torch
from conftest import train_tiny_tokenizer

TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune. Who speaks? Hamlet. Which play? Macbeth, Othello.\n")
PLAYS = ["Hamlet", "Macbeth", "Othello"]


def make_tokenizer(directory: Path):
    """A small byte-level BPE with glm's special tokens, and its HF tokenizer_config.json."""
    return train_tiny_tokenizer(directory, TEXT, vocab_size=400, repeat=20)


def make_base(directory: Path) -> Path:
    """A tiny random checkpoint with the tokenizer above, plus instruction and preference files beside it."""
    from glm_cli.core.checkpoint.directory import save_checkpoint
    from glm_cli.core.model.config import preset
    from glm_cli.core.model.transformer import Transformer

    make_tokenizer(directory / "tok")
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=512, n_layers=1, bos_token_id=0, eos_token_id=0, pad_token_id=1))
    save_checkpoint(directory / "base", model, tokenizer_dir=directory / "tok")
    sft = [{"prompt": f"Which play? {i}", "response": PLAYS[i % 3]} for i in range(24)]
    prefs = [{"prompt": f"Which play? {i}", "chosen": PLAYS[i % 3], "rejected": PLAYS[(i + 1) % 3]} for i in range(24)]
    for name, records in [("sft", sft), ("prefs", prefs)]:
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:20]))
        (directory / f"{name}_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[20:]))
    return directory / "base"
