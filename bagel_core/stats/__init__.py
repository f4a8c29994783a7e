"""Stage 3 of the data flow: exact token statistics per indexed sample (``token_stats.parquet``),
their per-dataset summary and the cap checks. Reads the index's tables by path; counts with
``bagel_core.sequence.tokens``."""
