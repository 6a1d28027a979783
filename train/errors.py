class TrainError(Exception):
    """A user-facing training problem; str() is one line."""
