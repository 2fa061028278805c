"""`glm dedup`: exact, line-level and MinHash near-duplicate removal, with a clustering step whose memory is bounded."""
