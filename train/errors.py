from sae_harvest.stores.errors import UserError


class TrainError(UserError):
    """A bad training option or input."""
