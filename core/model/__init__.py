"""The one Transformer every model command shares, its configuration, and the attention call behind it."""
