"""trime fairseq criterions (registered on import)."""
