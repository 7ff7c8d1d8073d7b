"""Page corpora and their indexes: files → pages (pages), the embedding job (embed), the index folder everything else
reads (store), FAISS (faiss_index) and the live manifest of served generations (live)."""
