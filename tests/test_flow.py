"""The rectified-flow objective and the latent packing."""

import math

import torch

from kiln.config import ObjectiveConfig, SchedulerConfig
from kiln.diffusion import diffusion_loss
from kiln.flow import calculate_shift, drop_captions, loss_by_bucket, sample_timesteps, time_shift
from kiln.models import pack, unpack


def test_pack_unpack_round_trip_and_layout():
    x = torch.randn(2, 4, 6, 8)
    tokens = pack(x)
    assert tokens.shape == (2, 12, 16)
    assert torch.equal(unpack(tokens, 6, 8), x)
    # Token 0 is the top-left 2x2 patch, channel-major like QwenImagePipeline._pack_latents.
    assert torch.equal(tokens[0, 0].view(4, 2, 2), x[0, :, :2, :2])


def test_shift_matches_diffusers():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift as diffusers_shift

    sched = SchedulerConfig()
    for n in (16, 256, 1024, 6889):
        assert math.isclose(calculate_shift(n, sched), diffusers_shift(n, 256, 8192, 0.5, 0.9), rel_tol=1e-9)
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(time_shift(0.0, t), t)
    assert (time_shift(1.0, t) > t).all()  # positive mu moves toward noise


def test_timesteps_logit_normal_and_shifted():
    g = torch.Generator().manual_seed(0)
    obj, sched = ObjectiveConfig(), SchedulerConfig()
    t_small = sample_timesteps(20000, 16, obj, sched, g)
    t_large = sample_timesteps(20000, 4096, obj, sched, torch.Generator().manual_seed(0))
    assert 0 < t_small.min() and t_small.max() < 1
    assert abs(t_small.median().item() - torch.sigmoid(torch.tensor(calculate_shift(16, sched))).item()) < 0.02
    assert t_large.mean() > t_small.mean()  # more tokens -> more noise


class _Recorder(torch.nn.Module):
    """Stands in for the transformer: returns a fixed prediction and records its inputs."""

    def __init__(self, prediction):
        super().__init__()
        self.prediction = prediction

    def forward(self, hidden_states, timestep, **kwargs):
        self.x_t, self.t = hidden_states, timestep
        return (self.prediction.expand_as(hidden_states),)


def test_loss_is_velocity_mse_on_the_straight_path():
    x0 = torch.randn(3, 4, 4, 4)
    model = _Recorder(torch.zeros(1))
    g = torch.Generator().manual_seed(1)
    loss, per_sample, t = diffusion_loss(model, x0, torch.zeros(3, 2, 8), torch.ones(3, 2, dtype=torch.bool),
                                             ObjectiveConfig(), SchedulerConfig(), g)
    # Replay the same draws: t first, then the noise.
    g = torch.Generator().manual_seed(1)
    t_ref = sample_timesteps(3, 4, ObjectiveConfig(), SchedulerConfig(), g)
    noise = torch.randn(pack(x0).shape, generator=g)
    assert torch.allclose(t, t_ref)
    x_t = (1 - t_ref[:, None, None]) * pack(x0) + t_ref[:, None, None] * noise
    assert torch.allclose(model.x_t, x_t)
    expected = (noise - pack(x0)).pow(2).mean(dim=(1, 2))  # zero prediction: error is the target itself
    assert torch.allclose(per_sample, expected) and torch.isclose(loss, expected.mean())
    # A perfect prediction has zero loss.
    perfect = _Recorder((noise - pack(x0)))
    perfect.forward = lambda hidden_states, timestep, **kw: ((noise - pack(x0)),)
    loss0, _, _ = diffusion_loss(perfect, x0, torch.zeros(3, 2, 8), torch.ones(3, 2, dtype=torch.bool),
                                     ObjectiveConfig(), SchedulerConfig(), torch.Generator().manual_seed(1))
    assert loss0.item() < 1e-10


def test_caption_dropout_replaces_with_empty_caption():
    text, mask = torch.ones(1000, 3, 4), torch.ones(1000, 3, dtype=torch.bool)
    null, null_mask = torch.full((2, 4), 7.0), torch.tensor([True, True])
    out, out_mask = drop_captions(text, mask, null, null_mask, 0.1, torch.Generator().manual_seed(0))
    dropped = (out[:, 0, 0] == 7.0)
    assert 60 < dropped.sum() < 140  # ~10%
    assert (out[dropped, 2] == 0).all() and not out_mask[dropped, 2].any()
    assert (out[~dropped] == 1).all()


def test_loss_by_bucket():
    buckets = loss_by_bucket(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.1, 0.15, 0.99]), 4)
    assert buckets == {0: (3.0, 2), 3: (3.0, 1)}


def test_adaln_zero_init_starts_at_zero_velocity_and_still_learns():
    from kiln.config import load_config
    from kiln.models import build_backbone, init_adaln_zero, predict

    torch.manual_seed(0)
    model = init_adaln_zero(build_backbone(load_config("smoke").model, latent_channels=4, text_dim=384))
    x, text = torch.randn(2, 16, 16), torch.randn(2, 5, 384)
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = predict(model, x, torch.tensor([0.3, 0.8]), text, mask, (4, 4))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (out - 1).square().mean().backward()
    opt.step()
    assert torch.count_nonzero(predict(model, x, torch.tensor([0.3, 0.8]), text, mask, (4, 4))) > 0


def test_drop_tokens_hides_tokens_and_never_a_whole_caption():
    from kiln.flow import drop_tokens

    mask = torch.tensor([[True] * 6 + [False] * 2, [True] + [False] * 7] * 64)  # (128, 8): 6 tokens, and 1
    assert torch.equal(drop_tokens(mask, 0.0), mask)
    out = drop_tokens(mask, 0.3, torch.Generator().manual_seed(0))
    assert not (out & ~mask).any()  # padding stays hidden
    assert out.any(dim=1).all()  # every caption keeps a token
    assert torch.equal(out[1::2], mask[1::2])  # a one-token caption is kept whole
    hidden = (mask[0::2] & ~out[0::2]).float().mean().item() * 8 / 6
    assert 0.2 < hidden < 0.4, hidden
    # Rows of a global batch draw what the whole batch draws, whatever the local caption length.
    whole = drop_tokens(mask, 0.3, torch.Generator().manual_seed(1), width=12)
    half = drop_tokens(mask[64:, :6], 0.3, torch.Generator().manual_seed(1), rows=slice(64, 128), global_batch=128,
                       width=12)
    assert torch.equal(half, whole[64:, :6])
