"""The EBT core: the MCMC step and loop (mcmc), the state spaces a chain moves in (spaces), the fused vocabulary
kernels of the text state (vocab_kernels), and the objectives that wrap a model with its loss (objective)."""
