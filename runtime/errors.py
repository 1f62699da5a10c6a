"""The one exception type that the CLI turns into a one-line message and exit code 2.

It lives in `runtime` (the lowest layer) so that every package can raise it without
importing the training code.
"""


class UserError(Exception):
    """Bad argument or bad input: the message names the file or argument."""
