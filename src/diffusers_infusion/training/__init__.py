"""The reusable core of ``examples/train_infusion.py``: instance data, trainable residuals, the training step."""

from .data import DEFAULT_TEMPLATES, InstanceData, TrainingDataError, load_instance_data
from .step import InfusionResiduals, infusion_training_loss

__all__ = [
    "DEFAULT_TEMPLATES",
    "InfusionResiduals",
    "InstanceData",
    "TrainingDataError",
    "infusion_training_loss",
    "load_instance_data",
]
