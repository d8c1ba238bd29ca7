"""The exceptions sdgen raises on purpose. The CLI turns each into one line ``Error: ...``: exit 2 for a
:class:`UsageError` (a bad option value, as click's own usage errors), exit 1 for every other
:class:`SdgenError` (a file, a device or the disk), 130/143 for an interrupt or termination."""


class SdgenError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class UsageError(SdgenError):
    """An option value outside its range or a combination of options that does not go together."""


class CheckpointError(SdgenError):
    """A checkpoint file or folder that cannot be used (missing, broken, unknown family, hostile)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks to run code or build objects outside the allow-list."""


class ConfigError(SdgenError):
    """An LDM yaml that does not parse or does not match the checkpoint."""


class InputError(SdgenError):
    """An input file that cannot be used (prompt file, init image, upscale input)."""


class DeviceError(SdgenError):
    """A device or precision that is not available here."""


class OutputError(SdgenError):
    """The output folder cannot be written (read-only, disk full)."""


class ModelOutputError(SdgenError):
    """The model produced NaN/inf even in fp32: its weights are broken."""


class OutOfMemory(SdgenError):
    """Out of memory at the bottom of the ladder."""


class Cancelled(Exception):
    """A run stopped through its cancel token (not a user mistake: images written before it are complete)."""


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that the same clean-up as Ctrl-C runs. A BaseException, as
    KeyboardInterrupt, so that library code catching ``Exception`` (diffusers' lazy imports) lets it through."""
