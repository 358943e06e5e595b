"""Decode: stream entry -> Event -> run record (bodies, SSE merge, redaction, filters)."""
