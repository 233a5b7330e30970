"""Parallelism applied to a plain model from outside: process groups (dist), tensor-parallel layers (tensor),
sequence parallelism, the pipeline schedule (pipeline), one plan per model family (plans), parallelize(), the EBT
prediction stream's recompute (recompute), the checkpoint form that reshards (checkpoint_form), ZeRO-1 (zero) and the
training engines (engines/)."""
