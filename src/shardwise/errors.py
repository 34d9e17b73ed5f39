"""The one exception type users see.

Every failure caused by bad input (a missing directory, an impossible TP degree, a prompt that is too
long) is raised as ShardwiseError so the CLI can print one clear line and exit non-zero, while real
bugs keep their tracebacks.
"""


class ShardwiseError(Exception):
    """Bad input or an environment problem, explained in one line."""
