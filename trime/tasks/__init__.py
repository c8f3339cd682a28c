"""trime fairseq tasks (registered on import)."""
