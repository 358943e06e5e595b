"""Delivery: the deliver task, one attempt, rate limiting, dead letters."""
