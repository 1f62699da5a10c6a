"""fieldlearn.tools: the tooling that measures and checks the product, kept apart from it.

The accuracy and cost benchmarks (`fieldlearn bench accuracy|cost`), the kernel self-check
(`python -m fieldlearn.tools.selfcheck`), the naive LwM baseline they compare against, and
the memory profiler with its measuring harness and planner (`fieldlearn profile`). Tools may
import the product (fieldlearn.device, export, runtime); the product never imports tools:
only the thin command files in fieldlearn.cli.commands reach in here, lazily, when the
user runs one of these commands (tests/test_import_graph.py checks it).
"""
