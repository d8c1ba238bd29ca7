"""The exceptions a user can cause. The CLI turns each into one line ``Error: ...`` and exit code 1."""


class SdgenError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class CheckpointError(SdgenError):
    """A checkpoint file or folder that cannot be used (missing, broken, unknown family, hostile)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks to run code or build objects outside the allow-list."""


class ConfigError(SdgenError):
    """An LDM yaml that does not parse or does not match the checkpoint."""


class InputError(SdgenError):
    """A bad option value or input file (prompt file, init image, size)."""


class DeviceError(SdgenError):
    """A device or precision that is not available here."""


class OutputError(SdgenError):
    """The output folder cannot be written (read-only, disk full)."""


class ModelOutputError(SdgenError):
    """The model produced NaN/inf even in fp32: its weights are broken."""


class OutOfMemory(SdgenError):
    """Out of memory at the bottom of the ladder."""
