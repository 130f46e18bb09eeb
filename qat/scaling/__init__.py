"""Scaling laws over bit-widths: runs and results tables, the law and its solver, precision
keys, plots. Imports numpy, scipy and matplotlib only, never torch (a test checks this)."""
