"""Using a trained model: System-2 inference (think) and topology-free exports (export)."""
