"""The error every schema raises for a bad value or key (one line: the key and the fix)."""


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the fix."""
