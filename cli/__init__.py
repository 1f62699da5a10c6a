"""fieldlearn.cli: the `fieldlearn` console script, a dispatcher that owns no command.

fieldlearn.cli.main maps each command name to its module (fieldlearn.cli.commands.* or
fieldlearn.runtime.classify) and imports that module only when it runs, so that
`fieldlearn classify` works on an inference-only device without the training code.
"""
