"""The knowledge base: ingestion, embeddings, hybrid search."""
