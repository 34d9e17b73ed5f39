"""The one exception type users see.

Every failure caused by bad input (a missing directory, an impossible TP degree, a prompt that is too
long) is raised as ShardwiseError so the CLI can print one clear line and exit non-zero, while real
bugs keep their tracebacks.
"""


class ShardwiseError(Exception):
    """Bad input or an environment problem, explained in one line.

    ``exit_code`` is what the CLI exits with: 2 for bad input; 1 when the line reports an internal
    error that surfaced elsewhere (a bug inside a rank, relayed by the parent).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
