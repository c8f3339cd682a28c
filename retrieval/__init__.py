"""Retrieval: BM25 batch plans and the FAISS datastore."""
