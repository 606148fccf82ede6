"""Placeholder: kernel not written yet."""
