"""The reusable core of ``examples/train_infusion.py``: instance data, trainable residuals, the step, the loop."""

from .checkpoints import find_resume_checkpoint, list_checkpoints, write_manifest
from .data import DEFAULT_TEMPLATES, InstanceData, TrainingDataError, check_caption_tokens, load_instance_data
from .loop import TrainingInputs, step_generator, training_steps
from .step import InfusionResiduals, infusion_training_loss

__all__ = [
    "DEFAULT_TEMPLATES",
    "InfusionResiduals",
    "InstanceData",
    "TrainingDataError",
    "check_caption_tokens",
    "find_resume_checkpoint",
    "TrainingInputs",
    "infusion_training_loss",
    "list_checkpoints",
    "load_instance_data",
    "write_manifest",
    "step_generator",
    "training_steps",
]
