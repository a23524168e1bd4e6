"""Using a backbone: loading any family for the tools, features, weighted k-NN and linear probe, the
in-training monitor, bulk embeddings, attention maps and plots.

Imports: ``hub``, ``models``, ``data`` and the base modules.
"""
