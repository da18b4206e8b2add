"""Training the fidelity knob with Δ: the step's gradients, a fresh knob = the exact method, the script's flags."""

import pytest
import torch
from huggingface_hub import ModelCard

from diffusers_infusion import CONCEPT_WEIGHT_NAME, ConceptMismatchError, InfusionConcept
from diffusers_infusion.attention import cross_attention_layers
from diffusers_infusion.fidelity import FidelityConfig
from diffusers_infusion.training import InfusionResiduals, infusion_training_loss

CONFIG = FidelityConfig(rank=2, max_timestep=600, norm_bound=1.0)


def _batch(pipe, dtype=torch.float32):
    with torch.no_grad():
        text, _ = pipe.encode_prompt(["a photo of a cat", "a cat on snow", "a dog"], "cpu", 1, False)
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    return text.to(dtype), z0.to(dtype), noise.to(dtype), [[5], [2], []]


def _randomize(model):
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.normal_(generator=torch.Generator().manual_seed(i))


def test_module_layout_and_initialization(pipe):
    model = InfusionResiduals.for_unet(pipe.unet, fidelity=CONFIG, seed=3)
    tensors = model()
    layers = list(cross_attention_layers(pipe.unet))
    assert list(tensors) == layers + [k for name in layers for k in (f"{name}.fidelity_up", f"{name}.fidelity_down")]
    assert all((u == 0).all() for u in model.fidelity_up)  # U = 0: a fresh knob is the exact method
    assert all(0 < v.abs().max() <= v.shape[0] ** -0.5 for v in model.fidelity_down)
    again = InfusionResiduals.for_unet(pipe.unet, fidelity=CONFIG, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.fidelity_down, again.fidelity_down))  # seeded
    off = InfusionResiduals.for_unet(pipe.unet, fidelity=FidelityConfig(rank=0))
    assert list(off()) == layers and len(list(off.parameters())) == len(layers)  # rank 0: today's module


def test_rank_0_and_a_fresh_knob_train_exactly_like_the_method(pipe):
    text, z0, noise, positions = _batch(pipe)
    t = torch.tensor([50, 300, 900])
    results = []
    for fidelity in (None, FidelityConfig(rank=0), CONFIG):
        model = InfusionResiduals.for_unet(pipe.unet, fidelity=fidelity)
        with torch.no_grad():
            for delta in model.deltas:
                delta.normal_(generator=torch.Generator().manual_seed(0))
        loss = infusion_training_loss(pipe.unet, pipe.scheduler, model(), z0, text, positions, noise=noise,
                                      timesteps=t, fidelity=model.fidelity_config)  # fmt: skip
        loss.backward()
        results.append((loss.detach(), torch.cat([d.grad for d in model.deltas]), model))
    for loss, grad, _ in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
    knob = results[2][2]
    assert any(u.grad.abs().max() > 0 for u in knob.fidelity_up)  # U learns from the first step


@pytest.mark.parametrize("replace_queries", [True, False])
def test_batched_and_separate_f_agree_on_the_knobs_gradient(pipe, replace_queries):
    pipe.to(dtype=torch.float64)
    model = InfusionResiduals.for_unet(pipe.unet, fidelity=CONFIG).double()
    _randomize(model)
    text, z0, noise, positions = _batch(pipe, torch.float64)
    t = torch.tensor([50, 500, 900])  # the gate (t < 600) is open for the first sample only
    results = []
    for batched in (True, False):
        model.zero_grad()
        loss = infusion_training_loss(pipe.unet, pipe.scheduler, model(), z0, text, positions, noise=noise,
                                      timesteps=t, replace_queries=replace_queries, batched=batched,
                                      fidelity=CONFIG)  # fmt: skip
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-12, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(grads_a, grads_b))
    n = len(model.deltas)
    assert all(g.abs().max() > 1e-8 for g in grads_a[n:])  # U and V both learn once U ≠ 0


def test_gradient_checkpointing_gives_the_same_knob_gradient_and_removes_its_hooks(pipe):
    unet = pipe.unet
    model = InfusionResiduals.for_unet(unet, fidelity=CONFIG)
    _randomize(model)
    text, z0, noise, _ = _batch(pipe)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()
        model.zero_grad()
        loss = infusion_training_loss(unet, pipe.scheduler, model(), z0[:2], text[:2], [[5], [2]], noise=noise[:2],
                                      timesteps=torch.tensor([100, 700]), fidelity=CONFIG)  # fmt: skip
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().max() > 0
    for attn in cross_attention_layers(unet).values():
        assert not attn.to_k._forward_hooks and not attn.to_out[0]._forward_pre_hooks
    assert not unet.time_proj._forward_pre_hooks


def test_to_concept_and_load_concept_round_trip_the_knob(pipe):
    model = InfusionResiduals.for_unet(pipe.unet, fidelity=CONFIG)
    _randomize(model)
    concept = model.to_concept("cat")
    assert concept.fidelity.config == CONFIG
    knob = concept.fidelity  # a file may list its tensors in any order
    knob.up, knob.down = dict(reversed(knob.up.items())), dict(reversed(knob.down.items()))
    fresh = InfusionResiduals.for_unet(pipe.unet, fidelity=CONFIG, seed=9)
    fresh.load_concept(concept)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    with pytest.raises(ConceptMismatchError, match="no fidelity knob of rank 2"):
        fresh.load_concept(InfusionResiduals.for_unet(pipe.unet).to_concept("cat"))


# ------------------------------------------------------------------------------------------------- the script
def test_script_trains_the_knob_records_it_and_resumes_it(setup, monkeypatch):
    from test_train_script import train

    flags = ("--fidelity_rank", "2", "--fidelity_layers", "finest", "--fidelity_max_timestep", "800")
    out = train(setup, "knob", *flags)
    concept = InfusionConcept.from_pretrained(out)
    assert concept.fidelity.config == FidelityConfig(rank=2, layers="finest", max_timestep=800)
    assert len(concept.fidelity.up) == 3 and any(u.abs().max() > 0 for u in concept.fidelity.up.values())
    card = ModelCard.load(out / "README.md").text
    assert "| fidelity_rank | 2 |" in card and "| fidelity_max_timestep | 800.0 |" in card and "fidelity knob" in card
    assert (out / "checkpoint-3" / CONCEPT_WEIGHT_NAME).exists()
    resumed = train(setup, "knob", *flags, "--resume_from_checkpoint", str(out / "checkpoint-3"))
    again = InfusionConcept.from_pretrained(resumed)
    for name, u in concept.fidelity.up.items():  # a resume from step 3 continues to the same U, bit for bit
        assert torch.equal(again.fidelity.up[name], u) and torch.equal(
            again.fidelity.down[name], concept.fidelity.down[name]
        )


def test_script_trains_delta_at_the_residual_lr_scale(setup):
    from test_train_script import train

    out = train(setup, "scaled", "--fidelity_rank", "2", "--fidelity_residual_lr_scale", "0.1", "--max_train_steps",
                "1", "--learning_rate", "1e-2")  # fmt: skip
    concept = InfusionConcept.from_pretrained(out)  # Adam's first step moves each entry by ~ its group's rate
    delta = max(d.abs().max().item() for d in concept.residuals.values())
    knob = max(u.abs().max().item() for u in concept.fidelity.up.values())
    assert 9e-4 < delta <= 1e-3 + 1e-7 and 9e-3 < knob <= 1e-2 + 1e-7
    assert "| fidelity_residual_lr_scale | 0.1 |" in ModelCard.load(out / "README.md").text


@pytest.mark.parametrize(
    "flags, match",
    [
        (("--fidelity_residual_lr_scale", "0.5"), "need --fidelity_rank > 0"),
        (("--fidelity_rank", "2", "--fidelity_residual_lr_scale", "2"), "must be in (0, 1], got 2.0"),
        (("--fidelity_rank", "-1"), "rank=-1 must be a whole number"),
        (("--fidelity_rank", "2", "--fidelity_norm_bound", "0"), "norm_bound=0.0 must be a positive number"),
        (("--fidelity_max_timestep", "300"), "need --fidelity_rank > 0"),
    ],
)
def test_script_refuses_bad_knob_flags(flags, match, capsys):
    from test_train_script import load_script

    with pytest.raises(SystemExit):
        load_script().parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "y",
                                  "--class_word", "cat", *flags])  # fmt: skip
    assert match in capsys.readouterr().err
