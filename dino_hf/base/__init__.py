"""The base every layer may import: the run folder's layout and readers (``run_folder``), progress
and logging (``progress``), the one error type of expected failures (``errors``) and the official
DINO recipe's constants (``official_recipe``).

Imports: nothing else of dino_hf.
"""
