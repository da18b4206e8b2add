"""The reusable core of ``examples/train_infusion.py``: instance data, trainable residuals, the step, the loop."""

from .data import DEFAULT_TEMPLATES, InstanceData, TrainingDataError, load_instance_data
from .loop import TrainingInputs, step_generator, training_steps
from .step import InfusionResiduals, infusion_training_loss

__all__ = [
    "DEFAULT_TEMPLATES",
    "InfusionResiduals",
    "InstanceData",
    "TrainingDataError",
    "TrainingInputs",
    "infusion_training_loss",
    "load_instance_data",
    "step_generator",
    "training_steps",
]
