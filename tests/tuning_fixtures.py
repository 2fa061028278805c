"""Small things the finetune and align tests share: a tokenizer and a tiny base checkpoint made on the spot."""

import json
from pathlib import Path

import torch

TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune. Who speaks? Hamlet. Which play? Macbeth, Othello.\n")
PLAYS = ["Hamlet", "Macbeth", "Othello"]


def make_tokenizer(directory: Path):
    """A small byte-level BPE with glm's special tokens, and its HF tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from glm_cli.core.tokenizer import SPECIAL_TOKENS, write_hf_tokenizer_config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    write_hf_tokenizer_config(directory)
    return tok


def make_base(directory: Path) -> Path:
    """A tiny random checkpoint with the tokenizer above, plus instruction and preference files beside it."""
    from glm_cli.core.checkpoint import save_checkpoint
    from glm_cli.core.config import preset
    from glm_cli.core.model import Transformer

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
