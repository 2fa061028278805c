"""Corpora and token shards on disk: formats, atomic writes, and the parallel map the data commands share."""
