"""bagel_core: the library behind bagel-pipeline. Pure Python + torch; it never imports Dagster.

Architecture
============
One package per stage of the data flow, each named for what it produces, stacked in layers.
A module may import from its own package and from any layer *below* it; packages on the same
line are independent of each other. ``import-linter`` checks this in CI (``[tool.importlinter]``
in ``pyproject.toml``), together with "``bagel_core`` never imports ``dagster``, ``assets`` or
``pipelines``"; ``tests/test_architecture.py`` proves the check fails on an upward import.

======================  ====================================================================
layer (top to bottom)   what it holds
======================  ====================================================================
``cli``                 the ``bagel`` console script: registers each stage's ``cli.add_parser``
``train | inference``   the training entry point (args, loop, optimiser, EMA, checkpoints) /
                        ``setup_models`` and the KV-cached ``Inferencer``
``loader``              ``PackedDataset``: reads a manifest's units, packs samples for the model
``plan``                sharding (upstream's rule), sampling manifests, the packing rule and its
                        simulation over the token statistics
``stats``               exact token statistics per sample and their summary (reads the index's
                        tables, so it may use their schema)
``index``               validation + quarantine + generated ``parquet_info`` (DuckDB, Arrow)
``data | model``        acquisition and decoding (safe fetch, example generator, tokenizer,
                        image transform) / the BAGEL network (MoT LLM, SigLIP NaViT, FLUX VAE,
                        attention backends, presets, released-layout checkpoint I/O)
``sequence``            pure shared rules: token accounting, patchify and 2-D position ids,
                        the packed layout and its attention rule
``config``              the dataset registry (the one registry every stage reads and the index
                        updates in place), dataset-group YAML, validation, discovery, errors,
                        image-transform arguments
======================  ====================================================================

Why this cut: the rules that must agree everywhere (how many tokens a sample costs, where an image
patch sits, who may attend to whom) sit below both the data side and the model, so neither reaches
into the other; the stage packages mirror the Dagster asset graph (``dataset_index`` ->
``token_stats`` -> ``sampling_manifest`` -> ``training_run``), so an asset calls one package; and
the loader sits above ``plan`` because it replays a plan, while ``plan`` never needs the loader.
The model knows nothing of data files or the trainer (torchtitan's rule); parallelism and training
are applied from ``train``.
"""
