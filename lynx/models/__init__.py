"""The networks: the Perceiver Resampler, the Lynx attention processors on diffusers' Wan, and weight I/O."""
