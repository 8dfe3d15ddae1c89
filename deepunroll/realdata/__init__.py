"""Measured EIT data read from a data folder the user points to (never shipped with the package)."""
