"""The one generation path: the seeded sampler, the fast decoders, codec decode and writing audio files."""
