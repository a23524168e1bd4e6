"""The run: ``DinoTrainingArguments``, the recipe constants, the step plan and schedules, optimisers,
one step, the loop, checkpoints and signals, metrics and monitors, machine choices, trackers.

Imports: ``eval``, ``hub``, ``models``, ``losses``, ``data`` and the base modules.
"""
