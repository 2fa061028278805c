"""Checkpoints on disk: glm's Hugging Face-compatible directory, the loader, and conversion from and to GGUF."""
