"""Helpers for the capture tests: user-code fixtures and a loading process that lacks them."""
