"""One exception type for every user-facing mistake; the CLI prints its message as one line."""


class KVSqueezeError(ValueError):
    """Bad input from the user (spec, ratio, model, file); the message names the fix."""
