"""Data preparation: raw WikiText / enwik8 files to fairseq data-bin (`trime-prepare`)."""
