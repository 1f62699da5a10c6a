"""fieldlearn.cli.commands: one module per `fieldlearn` command, each with
`add_arguments(parser)` and `run(args) -> int`. A command parses its options, calls one
library function (fieldlearn.field.*, fieldlearn.store.*, fieldlearn.device.*,
fieldlearn.export.*, fieldlearn.tools.*) and prints; it holds no pipeline. Nothing in the
library imports a command, and these modules are the only part of the product that may
reach into fieldlearn.tools (tests/test_import_graph.py).
"""
