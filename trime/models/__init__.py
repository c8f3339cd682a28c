"""trime fairseq models (registered on import)."""
