"""Errors users see: each says what was expected, what was found and what to do."""


class SdloraError(ValueError):
    """An expected failure caused by the input (bad file, wrong family, bad option)."""
    user_facing = True


class LoraFormatError(SdloraError):
    """The file is not a LoRA this toolkit can read (or is broken)."""


class FamilyMismatchError(SdloraError):
    """The LoRA was made for another model family than the model it is applied to."""


class UnmatchedKeysError(SdloraError):
    """Keys of the file could not be placed on the model (listed in the message)."""


def user_message(e: BaseException) -> str | None:
    """The one line a user gets for an expected error (ours, a bad value, a file-system problem
    explained by sdlora.paths), or None for a bug, which callers report with its type (and
    traceback where they log). The CLI, the UI's messages and its Library cards all ask this."""
    if getattr(e, "user_facing", False) or isinstance(e, ValueError):
        return str(e)
    if isinstance(e, OSError):
        from sdlora.paths import explain_oserror
        return explain_oserror(e)
    return None


def describe(e: BaseException) -> str:
    """user_message, or `Type: message` for an unexpected error."""
    msg = user_message(e)
    return msg if msg is not None else f"{type(e).__name__}: {e}"
