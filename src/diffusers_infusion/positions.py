"""Class-word positions for calls that pass ``prompt_embeds`` (prompt weighting, long-prompt tools).

A call with ``prompt_embeds`` and no ``prompt`` cannot look the class word up, so an active concept needs
``infusion_token_indices``. :func:`infusion_token_indices` computes them from the prompt's text, with the
pipeline's tokenizer, in the form the call takes (docs/quickstart.md, "Prompt weighting and prompt_embeds").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import InfusionCallError
from .tokens import find_class_word_positions

if TYPE_CHECKING:
    from .generation import InfusionGenerationMixin


def infusion_token_indices(
    pipe: InfusionGenerationMixin, prompt: str | Sequence[str], *, names: Sequence[str] | None = None
) -> dict[str, list[int]] | list[dict[str, list[int]]]:
    """Positions of the concepts' class words in ``prompt``, ready for ``pipe(..., infusion_token_indices=...)``.

    Positions are those of diffusers' ``encode_prompt`` tokenization (index 0 is the start token; the last
    sub-token of each occurrence of a phrase), so they index the rows of ``prompt_embeds`` made from the same text.
    Pass the text without any weighting syntax (``"a photo of a cat"`` for Compel's ``"a photo of a (cat)1.3"``).

    Args:
        pipe: An ``InfusionPipeline`` or ``InfusionXLPipeline`` with the concepts loaded.
        prompt: One prompt, or a list of prompts.
        names: Concepts to look up (default: the active ones).

    Returns:
        A dict concept name -> positions (concepts whose class word is not in the prompt are left out), or a list
        of such dicts, one per prompt.
    """
    if pipe.tokenizer is None:
        raise InfusionCallError(
            "infusion_token_indices needs the pipeline's tokenizer, and pipe.tokenizer is None. Load the pipeline "
            "with its tokenizer, or count the class word's positions in your own tokenization."
        )
    names = list(pipe.get_active_infusion_concepts() if names is None else names)
    pipe._check_names(names, argument="names")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = pipe.maybe_convert_prompt(prompts, pipe.tokenizer)  # textual-inversion tokens, as encode_prompt does
    per_prompt = []
    for text in texts:
        found = {}
        for name in names:
            positions = find_class_word_positions(pipe.tokenizer, text, pipe.infusion_concepts[name].class_word)
            if positions:
                found[name] = positions
        per_prompt.append(found)
    return per_prompt[0] if isinstance(prompt, str) else per_prompt
