"""Masked random-order generators: MAR (:mod:`.mar`)."""
from visar.generators.masked.mar import (MaskedGenerator, MaskedState, mask_by_order, numpy_orders, patchify,
                                         truncated_normal_ratio, unpatchify)

__all__ = ["MaskedGenerator", "MaskedState", "mask_by_order", "numpy_orders", "patchify", "truncated_normal_ratio",
           "unpatchify"]
