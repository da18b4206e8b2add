"""diffusers-infusion: personalize Stable Diffusion with Infusion concepts that do not overfit."""

__version__ = "0.1.0"

from .concept import CONCEPT_WEIGHT_NAME, InfusionConcept  # noqa: E402
from .errors import (  # noqa: E402
    ClassWordError,
    ConceptFileError,
    ConceptMismatchError,
    ConceptNotFoundError,
    FileClassWordError,
    InfusionCallError,
    InfusionError,
    UnknownConceptError,
)
from .generation import InfusionGenerationMixin, InfusionPipelineOutput  # noqa: E402
from .loaders import InfusionLoaderMixin  # noqa: E402
from .pipeline import InfusionPipeline  # noqa: E402
from .pipeline_xl import InfusionXLPipeline  # noqa: E402
from .positions import infusion_token_indices  # noqa: E402

__all__ = [
    "CONCEPT_WEIGHT_NAME",
    "ClassWordError",
    "ConceptFileError",
    "ConceptMismatchError",
    "ConceptNotFoundError",
    "FileClassWordError",
    "InfusionCallError",
    "InfusionConcept",
    "InfusionError",
    "InfusionGenerationMixin",
    "InfusionLoaderMixin",
    "InfusionPipeline",
    "InfusionPipelineOutput",
    "InfusionXLPipeline",
    "UnknownConceptError",
    "__version__",
    "infusion_token_indices",
]
