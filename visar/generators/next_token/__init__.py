"""Next-token generators: raster-order AR over discrete tokens (LlamaGen, :mod:`.llamagen`) and over
continuous tokens with a token head (the MAR paper's causal variant, :mod:`.continuous`)."""
from visar.generators.components.token_cache_steps import NextTokenState
from visar.generators.next_token.continuous import NextTokenContinuousGenerator
from visar.generators.next_token.llamagen import NextTokenGenerator

__all__ = ["NextTokenGenerator", "NextTokenContinuousGenerator", "NextTokenState"]
