"""Tokenizers, corpus-to-shard encoding, and conversations to ids (glm's chat format or the model's own template)."""
