"""User-facing errors: each says what was found, what is supported, and what to do."""


class MaceError(Exception):
    """An error caused by input the user can fix; hosts show its message as-is."""


class UnsupportedModelError(MaceError):
    """The file is not a Stable Diffusion 1.x / 2.x / SDXL base checkpoint we can edit."""


class InterruptedRun(MaceError):
    """The caller asked to stop; everything finished so far is saved and a rerun resumes."""
