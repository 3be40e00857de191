"""Pretrained packages, model references, the LM builder, adapters, checkpoint reading and export."""
