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
