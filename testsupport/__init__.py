"""Installed test-only code, used by tests/ and bench/: a pure-Python reference for image
decoding (images_reference) and a photographed-digit generator (photos)."""
