"""The one exception the `bench` and `tune` commands turn into a one-line error."""


class BenchError(Exception):
    """A problem worth one line to the user (server unreachable, unknown model, ...)."""
