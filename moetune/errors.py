"""The one exception type for user mistakes.

The CLI turns a `MoetuneError` into a one-line message and a non-zero exit code, never a traceback.
Raise it for anything the user can fix (a path, a recipe key, a model that is not MoE); let real
bugs raise whatever they raise.
"""


class MoetuneError(Exception):
    """A problem the user can fix. `str(err)` is the whole message; `exit_code` is what the CLI returns."""

    exit_code = 1


class RecipeError(MoetuneError):
    """A recipe that does not validate. Exit code 2, like argparse's usage errors."""

    exit_code = 2


class TrainingDiverged(MoetuneError):
    """The loss or the gradient norm became NaN or infinite; training stopped before saving anything broken."""

    exit_code = 3
