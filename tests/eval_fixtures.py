"""A tiny checkpoint with a tokenizer trained on the spot, shared by the generate and eval tests."""

from pathlib import Path

import torch
from conftest import train_tiny_tokenizer

TEXT = ("HAMLET. To be, or not to be, that is the question. OPHELIA. Good my lord, how does your honour? "
        "MACBETH. Is this a dagger which I see before me? LADY MACBETH. Out, damned spot! "
        "OTHELLO. Put up your bright swords, for the dew will rust them. Who speaks? Which play?\n")


def make_tokenizer(directory: Path):
    """A byte-level BPE (vocab 300) with glm's special tokens at ids 0..5."""
    return train_tiny_tokenizer(directory, TEXT, vocab_size=300, repeat=10)


def make_checkpoint(directory: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny model (vocab 320, 2 layers, context 128) saved with the tokenizer above."""
    from glm_cli.core.checkpoint.directory import save_checkpoint
    from glm_cli.core.model.config import preset
    from glm_cli.core.model.transformer import Transformer

    if not (directory.parent / "tok" / "tokenizer.json").exists():
        make_tokenizer(directory.parent / "tok")
    torch.manual_seed(seed)
    config = preset("tiny", vocab_size=320, bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_embeddings=False,
                    **overrides)
    model = Transformer(config)
    # Random init at std 0.02 gives near-uniform distributions; sharpen them so greedy and beam paths differ.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return save_checkpoint(directory, model, tokenizer_dir=directory.parent / "tok")
