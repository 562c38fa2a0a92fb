"""Analyses: scan (ME layer), explain, rigidity, sinks."""
