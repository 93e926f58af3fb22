"""How ``moelens-tiny`` was made: corpus builder, trainer, probe-set writer and specialization evidence.

Kept apart from the analysis and loading core: nothing in ``moelens`` imports this package, and
``moelens.load`` needs only the shipped checkpoint and the tiny-model builder in ``moelens.zoo``.
Run the steps as modules (``python -m moelens.training.corpus`` ...) or through the CLI
(``moelens zoo build-corpus | train-tiny | probes | evidence``); see the model card for the recipe.

- :mod:`moelens.training.corpus`: the multi-domain training corpus (``build_corpus``, ``read_split``, ``DOMAINS``).
- :mod:`moelens.training.train`: tokenizer and model training (``train_tiny``, ``heldout_windows``).
- :mod:`moelens.training.probes`: the probe sets in ``data/probes`` (``write_probes``, ``MARKERS``).
- :mod:`moelens.training.evidence`: NMI, targeted vs random ablation, massive activations, sinks (``evidence``).
"""
