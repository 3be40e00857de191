"""What only the demo and the tests use: the tiny codec/LM/classifier, synthetic sounds, the build cache."""
