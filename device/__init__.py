"""fieldlearn.device: the on-device class-incremental learner (Learning without Memorizing)."""

__version__ = "0.1.0"
