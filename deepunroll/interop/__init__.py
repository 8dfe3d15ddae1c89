"""Bridges to other libraries (optional extras): :mod:`deepunroll.interop.deepinv`."""
