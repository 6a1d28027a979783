from sae_harvest.stores.errors import UserError


class HarvestError(UserError):
    """A bad site name, a model or dataset that cannot be found or used, values that overflow."""
