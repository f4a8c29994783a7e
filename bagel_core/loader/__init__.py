"""The training data loader: ``PackedDataset`` reads the units a sampling manifest assigns to its
rank and worker (``readers``), decodes and tokenises samples, and packs them with the plan's packing
rule into model-ready sequences, with a ``state_dict`` that resumes exactly."""
