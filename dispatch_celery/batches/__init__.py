"""Batches: the blob codec (``codec``) and the Redis state of each batch (``state``)."""
