"""Data: the shard schema shared with data_prep/, the deterministic resumable loader, mixtures, and the corpora and
synthetic videos that ship with the package. Knows shards, tokens and frames, never a model."""
