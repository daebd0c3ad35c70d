"""Errors a user can cause. Each carries a message that says what to do; the CLI prints it on one line."""


class FlashMoeError(Exception):
    """Base class of every error the user can cause or fix."""


class BadFileError(FlashMoeError):
    """A missing, truncated, foreign or inconsistent model file."""


class UnsupportedError(FlashMoeError):
    """An architecture, quantisation type or option this runtime does not handle."""


class BudgetError(FlashMoeError):
    """A memory budget too small to run, or one that cannot be parsed."""


class StoreError(FlashMoeError):
    """An expert store that is missing, unfinished, corrupt, too new, or shorter than its manifest says."""


class ShortReadError(StoreError):
    """A read returned fewer bytes than the store or GGUF promised (file truncated or changed while open)."""


class ChecksumError(StoreError):
    """Expert bytes whose xxh3_64 checksum differs from the one recorded at repack time."""


class DiskFullError(FlashMoeError):
    """No space left on the device being written to."""
