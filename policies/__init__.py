"""Placeholder package: filled by later MorphServe issues."""
