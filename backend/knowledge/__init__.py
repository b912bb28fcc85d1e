"""The knowledge base: ingestion (type sniffing, extraction, chunking), embeddings, hybrid
search."""
