"""ray-vdr: Visual Document Retrieval training, indexing and serving on Ray."""

__version__ = "0.1.0"
