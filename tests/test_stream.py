"""One F+C forward: batched and separate (F without gradient) give the same prediction and the same gradient."""

import pytest
import torch

from diffusers_infusion.training import InfusionResiduals, infusion_training_loss


@pytest.mark.parametrize("replace_queries", [True, False])
def test_batched_and_separate_f_agree_on_loss_and_gradient(pipe, replace_queries):
    pipe.to(dtype=torch.float64)
    model = InfusionResiduals.for_unet(pipe.unet).double()
    with torch.no_grad():
        for delta in model.deltas:
            delta.normal_(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text, _ = pipe.encode_prompt(["a photo of a cat", "a cat on snow", "a dog"], "cpu", 1, False)
    g = torch.Generator().manual_seed(1)
    z0, noise = (
        torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 8, 8, generator=g).double(),
    )
    t = torch.tensor([50, 500, 900])
    results = []
    for batched in (True, False):
        model.zero_grad()
        loss = infusion_training_loss(
            pipe.unet, pipe.scheduler, model(), z0, text, [[5], [2], []], noise=noise, timesteps=t,
            replace_queries=replace_queries, batched=batched,
        )  # fmt: skip
        loss.backward()
        results.append((loss.detach(), [d.grad.clone() for d in model.deltas]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-12, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(grads_a, grads_b))
    assert any(a.abs().max() > 1e-6 for a in grads_a)  # Δ does receive a gradient


def test_mask_restricts_the_loss(pipe):
    model = InfusionResiduals.for_unet(pipe.unet)
    with torch.no_grad():
        text, _ = pipe.encode_prompt(["a cat"], "cpu", 1, False)
    z0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    args = (pipe.unet, pipe.scheduler, model(), z0, text, [[2]])
    full = infusion_training_loss(*args, noise=noise, timesteps=torch.tensor([300]))
    top = infusion_training_loss(*args, noise=noise, timesteps=torch.tensor([300]), mask=mask)
    bottom = infusion_training_loss(*args, noise=noise, timesteps=torch.tensor([300]), mask=1 - mask)
    assert torch.allclose((top + bottom) / 2, full, atol=1e-6) and not torch.allclose(top, bottom)


def test_gradient_checkpointing_gives_the_same_gradient_and_removes_its_hooks(pipe):
    from diffusers_infusion.attention import cross_attention_layers

    unet = pipe.unet
    model = InfusionResiduals.for_unet(unet)
    with torch.no_grad():
        for delta in model.deltas:
            delta.normal_(generator=torch.Generator().manual_seed(0))
        text, _ = pipe.encode_prompt(["a photo of a cat"] * 2, "cpu", 1, False)
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()
        model.zero_grad()
        loss = infusion_training_loss(unet, pipe.scheduler, model(), z0, text, [[5], [5]], noise=noise,
                                      timesteps=torch.tensor([100, 700]))  # fmt: skip
        loss.backward()
        grads.append(torch.cat([d.grad.flatten() for d in model.deltas]))
    assert torch.allclose(grads[0], grads[1], atol=1e-7) and grads[0].abs().max() > 0
    assert all(not a.to_q._forward_hooks and not a.to_v._forward_hooks for a in cross_attention_layers(unet).values())
