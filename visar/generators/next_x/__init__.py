"""Next-X generators: xAR (:mod:`.xar`) over the entities of :mod:`visar.generators.components.entities`."""
from visar.generators.next_x.xar import NextXGenerator

__all__ = ["NextXGenerator"]
