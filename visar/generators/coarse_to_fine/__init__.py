"""Coarse-to-fine generators: CTF (:mod:`.ctf`): an AR model over k-means clusters of the codebook
(:mod:`.kmeans`), then every fine label in one pass of an auxiliary model (:mod:`.auxiliary`)."""
from visar.generators.coarse_to_fine.ctf import CoarseToFineGenerator

__all__ = ["CoarseToFineGenerator"]
