"""BrainAgeCNN: the paper's parameter count, initialisation, adaptive pooling and FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsparse_lib.models import PAPER_CHANNELS, BrainAgeCNN, count_parameters, flops_per_volume


def paper_parameter_count(width: float = 1.0) -> int:
    """Worked out by hand from spec section 6: 3x3x3 convs with bias, then 1x1x1 256->64->1."""
    chans = [1] + [max(1, round(c * width)) for c in PAPER_CHANNELS]
    total = sum(27 * a * b + b for a, b in zip(chans[:-1], chans[1:]))
    head = max(1, round(64 * width))
    return total + (chans[-1] * head + head) + (head + 1)


def test_paper_model_has_2948801_parameters():
    assert paper_parameter_count() == 2_948_801
    assert count_parameters(BrainAgeCNN((91, 109, 91))) == 2_948_801


@pytest.mark.parametrize("shape", [(91, 109, 91), (45, 54, 45), (30, 36, 30), (8, 8, 8)])
def test_parameter_count_does_not_depend_on_input_size(shape):
    assert count_parameters(BrainAgeCNN(shape)) == 2_948_801


@pytest.mark.parametrize("width", [0.25, 0.5, 2.0])
def test_width_multiplier_scales_channels(width):
    assert count_parameters(BrainAgeCNN((30, 36, 30), width=width)) == paper_parameter_count(width)


def test_initialisation_glorot_kernels_zero_biases_and_mean_age_output_bias():
    torch.manual_seed(0)
    model = BrainAgeCNN((30, 36, 30), mean_age=55.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    for conv in convs[:-1]:
        assert torch.count_nonzero(conv.bias) == 0
    assert convs[-1].bias.item() == pytest.approx(55.5)
    # Glorot uniform bound sqrt(6 / (fan_in + fan_out)), fans include the receptive field
    conv = convs[3]
    fan_in = conv.in_channels * 27
    fan_out = conv.out_channels * 27
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    w = conv.weight
    assert w.abs().max() <= bound
    assert w.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)  # sd of U(-b, b)


@pytest.mark.parametrize("shape", [(91, 109, 91), (45, 54, 45), (30, 36, 30)])
def test_every_instance_norm_sees_at_least_two_voxels_per_axis(shape):
    model = BrainAgeCNN(shape, width=0.25)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[2:])))
             for m in model.modules() if isinstance(m, nn.InstanceNorm3d)]
    with torch.no_grad():
        model(torch.randn(1, 1, *shape))
    for h in hooks:
        h.remove()
    assert len(seen) == 6
    assert all(min(s) >= 2 for s in seen), seen


def test_paper_grid_keeps_the_papers_pooling_and_final_2x3x2_map():
    model = BrainAgeCNN((91, 109, 91), width=0.125)
    pools = [m for m in model.net if isinstance(m, nn.MaxPool3d)]
    assert len(pools) == 5 and all(tuple(p.kernel_size) == (2, 2, 2) for p in pools)
    seen = []
    model.net.avgpool.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[2:])))
    with torch.no_grad():
        model(torch.randn(1, 1, 91, 109, 91))
    assert seen == [(2, 3, 2)]  # so the adaptive average equals the paper's AvgPool3d((2, 3, 2))


def test_output_is_one_age_per_volume_and_varies_with_input():
    torch.manual_seed(1)
    model = BrainAgeCNN((30, 36, 30), width=0.25)
    out = model(torch.randn(3, 1, 30, 36, 30))
    assert out.shape == (3,)
    assert out.std() > 0


@pytest.mark.parametrize("bad", [(30, 36), (3, 36, 30)])
def test_bad_input_shape_is_refused(bad):
    with pytest.raises(ValueError, match="input_shape"):
        BrainAgeCNN(bad)


def test_bad_batch_shape_is_refused():
    with pytest.raises(ValueError, match="batch, 1"):
        BrainAgeCNN((30, 36, 30), width=0.25)(torch.randn(1, 30, 36, 30))


def test_flops_by_hand_on_a_tiny_model():
    # 8^3 input, width tiny: pooling keeps >= 2 voxels, so pools happen only at block 1 and 2
    model = BrainAgeCNN((8, 8, 8), width=1 / 32)  # channels 1, 2, 4, 8, 8; head 2
    chans = [1, 1, 2, 4, 8, 8]
    sizes = [8 ** 3, 4 ** 3, 2 ** 3, 2 ** 3, 2 ** 3]  # output voxels of conv1..conv5 (conv before pool)
    expected = sum(2 * 27 * a * b * n for a, b, n in zip(chans[:-1], chans[1:], sizes))
    expected += 2 * 8 * 2 * 2 ** 3 + 2 * 2 * 1 * 1
    assert flops_per_volume(model) == expected


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_output_scale_keeps_the_initial_prediction_at_the_mean_age(scale):
    torch.manual_seed(0)
    model = BrainAgeCNN((16, 16, 16), width=0.125, mean_age=61.0, output_scale=scale)
    with torch.no_grad():
        model.net.output.weight.zero_()  # only the bias is left: the prediction is exactly the mean age
    assert model(torch.randn(2, 1, 16, 16, 16)).tolist() == pytest.approx([61.0, 61.0])
    assert count_parameters(model) == count_parameters(BrainAgeCNN((16, 16, 16), width=0.125))


def test_output_scale_multiplies_the_output_layer():
    torch.manual_seed(0)
    plain = BrainAgeCNN((16, 16, 16), width=0.125, mean_age=60.0)
    scaled = BrainAgeCNN((16, 16, 16), width=0.125, mean_age=60.0, output_scale=10.0)
    scaled.load_state_dict(plain.state_dict())  # same weights, bias 60 -> prediction 10 x plain's
    x = torch.randn(2, 1, 16, 16, 16)
    assert torch.allclose(scaled(x), 10.0 * plain(x))
    with pytest.raises(ValueError, match="output_scale"):
        BrainAgeCNN((16, 16, 16), output_scale=0.0)
