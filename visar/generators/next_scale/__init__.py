"""Next-scale generators: VAR over a multi-scale residual VQ (:mod:`.var`) and FlowAR with flow matching
over KL latents (:mod:`.flowar`)."""
from visar.generators.next_scale.flowar import NextScaleFlowGenerator
from visar.generators.next_scale.var import (SCHEDULE_256, SCHEDULE_512, NextScaleGenerator, NextScaleState,
                                             block_causal_mask, scale_index)

__all__ = ["NextScaleGenerator", "NextScaleFlowGenerator", "NextScaleState", "SCHEDULE_256", "SCHEDULE_512",
           "block_causal_mask", "scale_index"]
