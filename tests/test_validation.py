"""Call arguments: misspelled keywords, silent coercions, non-finite strengths, truncated class words, Hub args."""

import logging
import warnings

import numpy as np
import pytest
import torch

from diffusers_infusion import (
    CONCEPT_WEIGHT_NAME,
    ConceptNotFoundError,
    InfusionCallError,
    InfusionConcept,
    UnknownConceptError,
)


@pytest.fixture
def cat_pipe(pipe, make_concept):
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat"), "cat")
    return pipe


def images(pipe, gen, prompt="a photo of a cat", **kwargs):
    return pipe(prompt, num_inference_steps=2, generator=gen(), output_type="np", **kwargs).images


# ------------------------------------------------------------------------------- item 4: strengths
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_non_finite_or_huge_strengths_are_refused(cat_pipe, bad):
    with pytest.raises(InfusionCallError, match=r"infusion_concepts\['cat'\]=.* finite numbers of magnitude"):
        cat_pipe("a cat", num_inference_steps=1, infusion_concepts={"cat": bad})
    with pytest.raises(InfusionCallError, match=r"strengths\[0\]=.* finite numbers"):
        cat_pipe.set_infusion_concepts(["cat"], [bad])
    with pytest.raises(InfusionCallError, match=r"strengths=.* finite numbers"):
        cat_pipe.set_infusion_concepts("cat", bad)
    assert cat_pipe.get_active_infusion_concepts() == {"cat": 1.0}  # nothing changed


def test_numpy_and_tensor_strengths_are_numbers(cat_pipe, gen):
    cat_pipe.set_infusion_concepts(["cat"], [np.float32(0.5)])
    assert cat_pipe.get_active_infusion_concepts() == {"cat": 0.5}
    cat_pipe.set_infusion_concepts("cat", torch.tensor(0.5))
    a = images(cat_pipe, gen, infusion_concepts={"cat": np.float64(0.5)})
    b = images(cat_pipe, gen, infusion_concepts={"cat": 0.5})
    assert np.array_equal(a, b)


# ------------------------------------------------------------------------------- item 6: misspelled keywords
@pytest.mark.parametrize(
    "keyword, hint",
    [
        ("infusion_concept", "Did you mean 'infusion_concepts'"),
        ("infusion_token_index", "Did you mean 'infusion_token_indices'"),
        ("infusion_strength", ""),
        ("return_base_image", "Did you mean 'return_base_images'"),
    ],
)
def test_misspelled_infusion_keywords_are_refused_with_the_valid_ones(cat_pipe, keyword, hint):
    with pytest.raises(InfusionCallError, match=f"Unknown keyword argument '{keyword}'.*{hint}") as error:
        cat_pipe("a cat", num_inference_steps=1, **{keyword: {"cat": 0.0}})
    assert "'infusion_concepts', 'infusion_fidelity', 'infusion_mode'" in str(error.value)


# ------------------------------------------------------------------------------- item 7: coercions, raw errors
@pytest.mark.parametrize("bad", ["12", [5.7], [True], 5.0, {"x": 1}])
def test_token_indices_are_never_coerced(cat_pipe, bad):
    with pytest.raises(InfusionCallError, match=r"infusion_token_indices\['cat'\]=.* not a list of integers \(token"):
        cat_pipe("a cat", num_inference_steps=1, infusion_token_indices={"cat": bad})


def test_integer_token_indices_of_any_kind_work(cat_pipe, gen):
    reference = images(cat_pipe, gen, infusion_token_indices={"cat": [5]})
    for same in (5, (5,), np.array([5]), torch.tensor([5]), [np.int64(5)], range(5, 6)):
        assert np.array_equal(images(cat_pipe, gen, infusion_token_indices={"cat": same}), reference)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"infusion_concepts": ["cat"]}, r"infusion_concepts\[0\]='cat' must be a dict by concept name"),
        ({"infusion_concepts": "cat"}, r"infusion_concepts='cat' must be a dict, a list of dicts"),
        ({"infusion_token_indices": [[5]]}, r"infusion_token_indices\[0\]=\[5\] must be a dict.*\[5\]"),
        ({"infusion_concepts": {"cat": "1"}}, r"infusion_concepts\['cat'\]='1' must be a number"),
        ({"infusion_concepts": {"cat": True}}, r"infusion_concepts\['cat'\]=True must be a number"),
    ],
)
def test_per_call_arguments_of_the_wrong_type(cat_pipe, kwargs, match):
    with pytest.raises(InfusionCallError, match=match):
        cat_pipe("a cat", num_inference_steps=1, **kwargs)


@pytest.mark.parametrize("prompt", [5, [5], ["a cat", None], b"a cat"])
def test_a_prompt_of_the_wrong_type(cat_pipe, prompt):
    with pytest.raises(InfusionCallError, match="prompt=.* must be a string, a list of strings, or None"):
        cat_pipe(prompt, num_inference_steps=1)


def test_loader_verbs_refuse_wrong_types_with_named_errors(pipe, make_concept, tmp_path):
    concept = make_concept(pipe.unet)
    for bad in (7, "", "  "):
        with pytest.raises(UnknownConceptError, match=f"adapter_name={bad!r} must be a non-empty string"):
            pipe.load_infusion_concept(concept, bad)
    for source in (None, 7, ""):
        with pytest.raises(ConceptNotFoundError, match=f"={source!r} is not a concept source.*InfusionConcept"):
            pipe.load_infusion_concept(source)
    assert pipe.get_list_infusion_concepts() == []
    pipe.load_infusion_concept(concept, "cat")
    with pytest.raises(UnknownConceptError, match="names=7 must be a concept name or a list"):
        pipe.unload_infusion_concept(7)
    with pytest.raises(UnknownConceptError, match=r"names has \[7\], which are not concept names"):
        pipe.set_infusion_concepts([7])
    with pytest.raises(InfusionCallError, match=r"names names \['cat'\] more than once"):
        pipe.set_infusion_concepts(["cat", "cat"], [1, 0])
    with pytest.raises(InfusionCallError, match=r"strengths\[0\]='abc' must be a number"):
        pipe.set_infusion_concepts(["cat"], ["abc"])
    with pytest.raises(InfusionCallError, match="strengths='abc' must be a number or a list"):
        pipe.set_infusion_concepts(["cat"], "abc")
    assert pipe.get_active_infusion_concepts() == {"cat": 1.0}
    pipe.unload_infusion_concept(["cat", "cat"])  # unloading twice in one call is harmless
    assert pipe.get_list_infusion_concepts() == []


# ------------------------------------------------------------------------------- item 8: truncated class word
def test_a_class_word_cut_off_by_truncation_warns(cat_pipe, gen, sd_pipe, caplog):
    long_prompt = "a photo of a " + "very " * 80 + "cat"
    fine = "a photo of a cat"
    with caplog.at_level(logging.WARNING, logger="diffusers_infusion"):
        out = images(cat_pipe, gen, prompt=[fine, long_prompt])
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("diffusers_infusion")]
    assert len(messages) == 1 and "Concept 'cat'" in messages[0] and "in prompt 1 " in messages[0], messages
    plain = sd_pipe([fine, long_prompt], num_inference_steps=2, generator=gen(), output_type="np").images
    assert np.array_equal(out[1], plain[1])  # the truncated prompt is the base image: hence the warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusers_infusion"):
        images(cat_pipe, gen, prompt="a photo of a dog")  # no class word at all: nothing to warn about
    assert not [r for r in caplog.records if r.name.startswith("diffusers_infusion")]


# ------------------------------------------------------------------------------- Hub arguments
def test_hub_arguments_are_validated_as_huggingface_hub_does(pipe, make_concept, tmp_path):
    make_concept(pipe.unet).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="resume_download"):  # deprecated Hub arguments: ignored with a warning
        name = pipe.load_infusion_concept(tmp_path, resume_download=True)
    with pytest.warns(UserWarning, match="proxies"):
        concept = InfusionConcept.from_pretrained(tmp_path / CONCEPT_WEIGHT_NAME, proxies={"https": "x"})
    for layer, tensor in concept.residuals.items():
        assert torch.equal(pipe.infusion_concepts[name].residuals[layer], tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for bad in ("user/my--cat", "a/b/c", "user/cat.git"):  # not a path, not a valid repo id: named, no request
            with pytest.raises(ConceptNotFoundError, match=f"'{bad}' is neither an existing file or folder nor"):
                InfusionConcept.from_pretrained(bad)
