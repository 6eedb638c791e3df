"""Offline preparation: `morphserve prepare` builds a pack (W4 twin, swap order, quality
curve) once per model; the pack format and the shipped data live here too."""
