"""Training data: triplet sources on Ray Data (sources), their validation (triplets), image checks (images) and the
synthetic VDR dataset (synthetic, render)."""
