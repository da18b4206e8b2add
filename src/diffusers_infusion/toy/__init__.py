"""The toy world: a procedural image world where everything Infusion promises can be seen and measured.

- :mod:`.world`: 64x64 scenes (5 classes, 8 colors, 5 textured backgrounds, 3 positions, 2 sizes, up to two
  objects) rendered deterministically from attributes, and their captions.
- :mod:`.looks`: toy world 2's looks (patterns in two colors, marks), their captions and the held-out looks.
- :mod:`.reader`: a tiny CNN that reads background, class, color and position back off an image.
- :mod:`.concepts`: personal concepts (``my_cat``, ``my_dog``, ``my_teddy``, ``my_cup``) and the concept-similarity
  score.
- :mod:`.model`: the toy Stable Diffusion's component configs and builders; the trained model ships in
  ``examples/toy_world/model``.
- :mod:`.evaluate`: text-following accuracy of a pipeline on held-out attribute combinations.
"""

from .concepts import CONCEPTS, ToyConcept, concept_similarity, load_concept_photos, write_concept_photos
from .evaluate import evaluate_text_following, generate, held_out_prompts, score_images
from .model import TOY_MODEL_DIR, build_toy_components, build_toy_tokenizer, load_toy_pipeline
from .reader import Reading, ToyReadObject, load_reader, read_images, reader_accuracy
from .world import (
    BACKGROUNDS,
    CLASSES,
    COLORS,
    POSITIONS,
    SIZES,
    VOCABULARY,
    Scene,
    ToyObject,
    caption,
    held_out_combinations,
    is_held_out,
    render,
    sample_scene,
)

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "COLORS",
    "CONCEPTS",
    "POSITIONS",
    "SIZES",
    "TOY_MODEL_DIR",
    "VOCABULARY",
    "Reading",
    "Scene",
    "ToyConcept",
    "ToyObject",
    "ToyReadObject",
    "build_toy_components",
    "build_toy_tokenizer",
    "caption",
    "concept_similarity",
    "evaluate_text_following",
    "generate",
    "held_out_combinations",
    "held_out_prompts",
    "is_held_out",
    "load_concept_photos",
    "load_reader",
    "load_toy_pipeline",
    "read_images",
    "reader_accuracy",
    "render",
    "sample_scene",
    "score_images",
    "write_concept_photos",
]
