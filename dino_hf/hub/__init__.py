"""Sharing a backbone: the model card, the push through ``huggingface_hub`` and the import of official
facebookresearch/dino checkpoints.

Imports: ``models``, ``losses``, ``data`` and the base modules.
"""
