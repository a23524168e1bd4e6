"""The networks: ``DinoConfig`` (any family's backbone config, the head and the loss shape),
``DinoHead`` and ``DinoForPreTraining`` (student, teacher, EMA, parameter groups, export), the
backbone family registry and the ViT fast path.

Imports: ``losses``, ``data`` and the base modules only.
"""
