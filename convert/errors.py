"""The one error type the converter raises for bad input."""


class ConversionError(Exception):
    """Bad input or an impossible request: the CLI prints it on one line and exits with 2."""
