"""Training data from unlabeled documents: pages → generated queries → filters → mined hard negatives → train and
eval splits by document, with a dataset card."""
