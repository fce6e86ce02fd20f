"""Layer library: layers as tensor networks (convolutions, attention, ...)."""
