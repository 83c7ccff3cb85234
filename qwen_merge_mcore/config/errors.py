"""The one exception type for configuration problems."""


class ConfigError(ValueError):
    """A configuration value is wrong. `key` is the dotted path of the offending value."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"config error at '{key}': {reason}" if key else f"config error: {reason}")
