"""Generation with a KV cache and the logit processors that choose each next token."""
