"""User-facing errors. The CLI prints ``str(error)`` as one line and exits with code 2."""


class MoeCompressError(Exception):
    """Bad input or an impossible request: the message says what is wrong and what to do."""


class UnsupportedModelError(MoeCompressError):
    """The model is not an MoE model moecompress can view."""


class CalibrationError(MoeCompressError):
    """Calibration data cannot be built from what the user gave."""
