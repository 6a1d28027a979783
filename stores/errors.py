class StoreError(Exception):
    """A problem with a store that the user can act on; str() is one line."""
