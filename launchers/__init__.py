"""Cluster launchers around `pipeline.train.trainer.train`: run them from the repository root,
e.g. `python -m launchers.ray_train --config configs/demo_fmnist_resnet_ann.yaml`."""
