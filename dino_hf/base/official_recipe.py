"""The official DINO recipe's constants (facebookresearch/dino ``main_dino.py``, ViT-S/16), written
once: the defaults of ``DinoConfig``, ``DinoTrainingArguments`` and ``DinoSchedules``, and the
reference values the collapse monitor's remedies start from.

A leaf: it imports nothing, so the model, the arguments, the schedules and the monitors all read it.
"""

OFFICIAL_LEARNING_RATE = 5e-4  # per 256 images (scaled by the global batch)
OFFICIAL_MIN_LEARNING_RATE = 1e-6
OFFICIAL_WEIGHT_DECAY = 0.04
OFFICIAL_WEIGHT_DECAY_END = 0.4
OFFICIAL_TEACHER_MOMENTUM = 0.996
OFFICIAL_TEACHER_TEMPERATURE = 0.04  # after the warm-up, and at its start
OFFICIAL_STUDENT_TEMPERATURE = 0.1
OFFICIAL_CENTER_MOMENTUM = 0.9
OFFICIAL_MAX_GRAD_NORM = 3.0
OFFICIAL_DROP_PATH_RATE = 0.1
#: Passes over the data of the official short recipe (when no run length is given).
OFFICIAL_NUM_TRAIN_EPOCHS = 100.0
#: The weighted k-NN's vote temperature: weights exp(similarity / T).
OFFICIAL_KNN_TEMPERATURE = 0.07
#: How the teachers avoid collapse by default (DINO's centering; the methods: dino_hf.losses.validation).
DEFAULT_TEACHER_CENTERING = "centering"
#: Sinkhorn-Knopp iterations of ``teacher_centering="sinkhorn_knopp"`` (DINOv2's value).
DINOV2_SINKHORN_ITERATIONS = 3
