"""One-off studies behind the write-ups in ``bench/results/`` (``python -m bench.studies.NAME``)."""
