"""The one exception type of the package for input a user can fix."""


class BadInput(ValueError):
    """A malformed or unsupported file, config, flag or value: the programs print its message
    as one line and exit with status 2."""
