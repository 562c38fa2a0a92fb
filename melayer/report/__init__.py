"""Reporting: console output, atomic files, plots."""
