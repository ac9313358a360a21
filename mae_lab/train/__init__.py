"""Training stages: the MAE model, masking, pretraining, probing, fine-tuning, checkpoints, loaders."""
