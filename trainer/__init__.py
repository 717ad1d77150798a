"""monosemantic trainer: corpus, reference LM, harvesting, SAE training, evaluation, publishing."""
