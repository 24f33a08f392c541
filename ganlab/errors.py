"""The errors that mean a user mistake: the CLI prints their message as one line and exits 2."""


class UserError(ValueError):
    """A user mistake (config, data, weights, checkpoint, source). The CLI shows its message as one
    line and exits 2; whitespace is folded so that the message stays one line whatever it quotes."""

    def __init__(self, msg):
        super().__init__(" ".join(str(msg).split()))


class ConfigError(UserError):
    """A mistake in an experiment file or override."""
