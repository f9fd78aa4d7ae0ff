"""Compact, bit-exact storage formats for compressed weights (entropy coding)."""
