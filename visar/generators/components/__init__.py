"""Pieces that several generator families share, each written once: the Llama trunk, the cached
next-token steps, the AdaLN encoder-decoder (FlowAR, xAR), the token heads and their schedules, the flow
head transformer and the entity layouts."""
