"""ebwm-scale: pretraining Energy-Based World Models (EBT) and their autoregressive baselines at scale."""

__version__ = "0.1.0"
