"""The one error type of the input pipeline."""


class DataError(ValueError):
    """Input data that cannot be used (missing, empty, corrupt, or out of vocabulary).

    The message names the bad path, record or value.
    """
