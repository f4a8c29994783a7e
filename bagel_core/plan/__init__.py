"""Stage 4 of the data flow: which data each rank and DataLoader worker reads (``sharding``, upstream's
rule), the sampling manifest that records it (``manifest``), and the packing rule with its
simulation over the token statistics (``packing``). The training loader replays exactly this plan."""
