"""The command-line tools, installed as console scripts (``[project.scripts]`` in pyproject.toml):

| command | module | what |
| --- | --- | --- |
| ``dino-hf-train`` | :mod:`dino_hf.cli.train` | DINO pre-training (``accelerate launch`` / ``torchrun`` too) |
| ``dino-hf-eval`` | :mod:`dino_hf.cli.evaluate` | weighted k-NN and linear probe of a frozen backbone |
| ``dino-hf-attention`` | :mod:`dino_hf.cli.attention` | last-layer CLS attention maps of images |
| ``dino-hf-push`` | :mod:`dino_hf.cli.push` | a run's backbone, card and records to the Hub |
| ``dino-hf-convert`` | :mod:`dino_hf.cli.convert` | official DINO checkpoints to a transformers folder |
| ``dino-hf-embed`` | :mod:`dino_hf.cli.embed` | embeddings of a whole image dataset to parquet |

``scripts/*.py`` are thin wrappers of these modules. Every command takes the same spelling for the
same thing (``--model_name_or_path``, ``--dataset_name``, ``--image_column``, ``--output_dir``...),
accepts a backbone folder, a Hub id, a run folder or a ``DinoForPreTraining`` folder wherever it
takes a backbone, answers bad input with one sentence and exit status 2 (``--debug`` shows the
traceback), and shows progress bars only on a terminal (:mod:`dino_hf.cli.console`). The flags that name
a model and the backbone they load are declared once, in :mod:`dino_hf.cli.arguments`.
"""
