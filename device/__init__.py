"""fieldlearn.device: the on-device class-incremental learner (Learning without Memorizing).

The version of fieldlearn is the package metadata's (fieldlearn.runtime.metadata.fieldlearn_version).
"""
