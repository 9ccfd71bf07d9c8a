"""The error a malformed or mismatched checkpoint raises."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into (or written from) the model.

    The message names the tensor or config key and, for shape problems, both shapes.
    """
