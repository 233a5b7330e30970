"""Parallelism applied from outside the models: process groups, data parallelism (later TP, PP, ZeRO)."""
