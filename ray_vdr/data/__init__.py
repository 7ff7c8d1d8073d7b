"""Data: synthetic VDR pages, image validation, triplet validation and the Ray Data pipelines around them."""
