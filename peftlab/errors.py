"""User-facing errors.

Anything the user can fix (a recipe key, a data file, a command-line argument) raises
:class:`PeftlabError`. The CLI prints it as one line and exits with ``exit_code`` (2 for bad
input); it never shows a traceback for these.
"""


class PeftlabError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2


class TrainingError(PeftlabError):
    """Training stopped for a reason that is not bad input (NaN loss, broken process group)."""

    exit_code = 3


class VerificationError(PeftlabError):
    """A merged or exported checkpoint did not reproduce the model it came from."""

    exit_code = 4
