"""fieldlearn.device: the learning core of the on-device class-incremental learner (Learning
without Memorizing): model, methods, losses, attention, ops, learner, classifier, teachers,
config, data, metrics. It imports nothing above it: the version store (fieldlearn.store), the
field apps (fieldlearn.field) and the command line (fieldlearn.cli) build on it
(tests/test_import_graph.py).

The version of fieldlearn is the package metadata's (fieldlearn.runtime.metadata.fieldlearn_version).
"""
