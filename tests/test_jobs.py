"""Jobs files (JSONL, CSV, prompt file × grid), bad lines named by number, and the batch plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffusers_infusion.batch_generation import plan_batches, render_batch
from diffusers_infusion.jobs import GenerationJob, JobFileError, grid_jobs, read_jobs, read_prompt_file

DEFAULTS = {"steps": 3, "guidance_scale": 5.0, "height": None, "width": None, "negative_prompt": ""}


def test_jsonl_and_csv_give_the_same_jobs(tmp_path):
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text(
        '{"prompt": "a cat on snow", "concepts": {"my_cat": 1.0, "my_dog": 0.5}, "seed": 3, "height": 64}\n'
        "\n# a comment\n"
        '{"prompt": "a dog", "negative_prompt": "blurry", "steps": 7, "guidance_scale": 2}\n'
    )
    csv = tmp_path / "jobs.csv"
    csv.write_text(
        "prompt,negative_prompt,concepts,seed,steps,guidance_scale,height,width\n"
        'a cat on snow,,"my_cat:1.0;my_dog:0.5",3,,,64,\n'
        'a dog,blurry,,,7,2,,\n'
    )
    from_jsonl = read_jobs(jsonl, defaults=DEFAULTS, known_concepts=["my_cat", "my_dog"])
    from_csv = read_jobs(csv, defaults=DEFAULTS, known_concepts=["my_cat", "my_dog"])
    assert [j.fields() for j in from_jsonl] == [j.fields() for j in from_csv]
    cat, dog = from_jsonl
    assert cat.fields() == {"prompt": "a cat on snow", "concepts": {"my_cat": 1.0, "my_dog": 0.5}, "seed": 3,
                            "steps": 3, "guidance_scale": 5.0, "negative_prompt": "", "height": 64, "width": None}
    assert (dog.steps, dog.guidance_scale, dog.negative_prompt, dog.seed, dog.concepts) == (7, 2.0, "blurry", 0, {})
    assert cat.source.endswith("jobs.jsonl:1") and dog.source.endswith("jobs.jsonl:4")
    assert from_csv[1].source.endswith("jobs.csv:3")
    assert cat.job_id({"model": "a"}) != cat.job_id({"model": "b"}) == from_csv[0].job_id({"model": "b"})


def test_every_bad_line_is_named_with_its_number(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join([
        '{"prompt": "a cat", "seed": 1}',
        '{"prompt": "a cat", "seed": "one"}',
        '{"prompt": "a cat", "concepts": {"my_kat": 1}}',
        '{"prompt": "a cat", "sede": 2}',
        '{"prompt": "a cat"',
        '["a cat"]',
        '{"prompt": "", "seed": 1}',
        '{"prompt": "a cat", "height": 30}',
        '{"prompt": "a cat", "concepts": {"my_cat": "strong"}}',
    ]))  # fmt: skip
    with pytest.raises(JobFileError) as error:
        read_jobs(path, defaults=DEFAULTS, known_concepts=["my_cat"])
    message = str(error.value)
    assert "8 bad line(s)" in message and str(path) in message and "line 1:" not in message
    for expected in (
        "line 2: 'seed' must be an integer >= 0, got 'one'",
        "line 3: concept 'my_kat' is not declared (declared: ['my_cat']); declare it with --concept my_kat=",
        "line 4: unknown field 'sede'",
        "line 5: not valid JSON",
        "line 6: a job line must be a JSON object, got list",
        "line 7: 'prompt' must be a non-empty string",
        "line 8: 'height' must be an integer >= 8 and a multiple of 8, got 30",
        "line 9: 'concepts.my_cat' must be a number, got 'strong'",
    ):
        assert expected in message, (expected, message)


def test_bad_csv_rows_and_files(tmp_path):
    path = tmp_path / "jobs.csv"
    path.write_text("prompt,seed,concepts\na cat,1,my_cat:1\na cat,x,\na cat,1,my_cat=1\na cat,1,my_cat:1,extra\n")
    with pytest.raises(JobFileError) as error:
        read_jobs(path, defaults=DEFAULTS, known_concepts=["my_cat"])
    message = str(error.value)
    assert "3 bad line(s)" in message and "line 3: 'seed'" in message
    assert "line 4: 'concepts' must look like" in message
    assert "line 5: 4 cells for 3 columns" in message
    (tmp_path / "no_prompt.csv").write_text("text,seed\na cat,1\n")
    with pytest.raises(JobFileError, match="line 1: the CSV header must name a 'prompt' column"):
        read_jobs(tmp_path / "no_prompt.csv")
    with pytest.raises(JobFileError, match="must end in .jsonl or .csv"):
        (tmp_path / "jobs.txt").write_text("a cat\n")
        read_jobs(tmp_path / "jobs.txt")
    with pytest.raises(JobFileError, match="does not exist"):
        read_jobs(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n# nothing\n")
    with pytest.raises(JobFileError, match="holds no jobs"):
        read_jobs(tmp_path / "empty.jsonl")


def test_grid_shares_one_F_stream_per_prompt_and_seed_and_batches_by_shape(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat on snow\n\n# skipped\na cat at night\n")
    prompts = read_prompt_file(tmp_path / "prompts.txt")
    assert prompts == [(1, "a cat on snow"), (4, "a cat at night")]
    jobs = grid_jobs(prompts, concepts=["my_cat"], strengths=[0.5, 1.0], seeds=[0, 1], defaults=DEFAULTS,
                     include_base=True)  # fmt: skip
    assert len(jobs) == 2 * 2 * 3
    batches = plan_batches(jobs + jobs[:2], batch_size=3)  # duplicates are rendered once
    assert [len(b.groups) for b in batches] == [3, 1] and sum(len(b) for b in batches) == 12
    for batch in batches:
        assert batch.variants == [{}, {"my_cat": 0.5}, {"my_cat": 1.0}]
        for group in batch.groups:  # one prompt and seed per group, its variants in order
            assert len({j.shared_stream_key for _, j in group}) == 1
            assert [dict(j.concepts) for _, j in group] == batch.variants
    mixed = [GenerationJob("a cat", {"c": 1.0}, steps=3), GenerationJob("a cat", {"c": 1.0}, steps=4),
             GenerationJob("a dog", {"c": 1.0}, steps=3)]  # fmt: skip
    assert [[i for i, _ in b.jobs] for b in plan_batches(mixed, batch_size=8)] == [[0, 2], [1]]
    with pytest.raises(ValueError, match="batch_size=0"):
        plan_batches(jobs, batch_size=0)


def test_render_batch_gives_each_job_its_own_image(pipe, make_concept):
    """Two prompts × three variants in one call: each image equals that job rendered alone."""
    pipe.load_infusion_concept(make_concept(pipe.unet, "cat", seed=1), "my_cat")
    jobs = [GenerationJob(prompt, concepts, seed=seed, steps=2, guidance_scale=3.0, height=32, width=32)
            for prompt, seed in (("a photo of a cat", 5), ("a cat on a mat", 6))
            for concepts in ({}, {"my_cat": 0.5}, {"my_cat": 1.0})]  # fmt: skip
    (batch,) = plan_batches(jobs, batch_size=2)
    results = render_batch(pipe, batch, output_type="np")
    assert [i for i, _, _ in results] == list(range(6))
    for _, job, image in results:
        alone = render_batch(pipe, plan_batches([job], batch_size=1)[0], output_type="np")[0][2]
        np.testing.assert_allclose(image, alone, atol=1e-5)
    base, half, full = (r[2] for r in results[:3])
    assert np.abs(full - base).max() > 1e-3 and np.abs(half - base).max() > 1e-4  # the concept changes the image
    assert json.dumps(jobs[1].fields())  # the manifest's fields are JSON
