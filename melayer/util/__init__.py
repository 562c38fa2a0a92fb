"""Plumbing below every stage: errors, console progress, atomic file io."""
