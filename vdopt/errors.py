"""User-facing errors.

Every failure a user can cause (a bad recipe, a missing checkpoint, an edited bundle, a wrong
input shape, an op a backend cannot lower) is raised as a `VdoptError` whose message is one
paragraph that says what was wrong, where, and what to do. The CLI prints the message and exits
non-zero; only genuine bugs surface as tracebacks.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (export and compiler errors run to pages), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class VdoptError(Exception):
    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class RecipeError(VdoptError):
    pass


class CaptureError(VdoptError):
    pass


class PassError(VdoptError):
    pass


class LoweringError(VdoptError):
    pass


class BundleError(VdoptError):
    pass


class RunInputError(VdoptError):
    pass
