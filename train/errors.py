from sae_harvest.stores.errors import UserError


class TrainError(UserError):
    """A bad training option or input."""


class Diverged(TrainError):
    """Training produced a non-finite loss or weights: the run stops without saving them."""
