"""Ingest: stream -> batches -> tasks (the bridge, task publishing, stream checks)."""
