"""Measuring retrieval: one metrics module, the Matryoshka evaluation used in training, two-stage evaluation (embed
only vs embed + rerank) and promotion's comparison, and hard-negative mining from an index."""
