"""Training on Ray Train: the driver (run), the workers' loop (worker), the embedder and reranker recipes, the feeder
and its duplicate-free global batches, the trainer, GradCache under DeepSpeed, and the reranker's training run."""
