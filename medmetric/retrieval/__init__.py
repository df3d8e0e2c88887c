"""Case retrieval: embed images with a trained model, keep an on-disk index, search it."""
