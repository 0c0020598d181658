"""Teacher backends: turn batches of token ids into the per-position arrays of the cache."""
