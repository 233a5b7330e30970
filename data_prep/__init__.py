"""Data preparation jobs (Ray): text -> sentencepiece -> WebDataset shards."""
