"""The paper's brain-age 3D-CNN, with a width multiplier and any input size.

Architecture (FedSparsify, spec section 6): five blocks of Conv3d(3x3x3, same padding, bias) ->
InstanceNorm3d(affine=False, eps=1e-3) -> MaxPool3d(2) -> ReLU with 32, 64, 128, 256, 256
channels; then Conv3d 1x1x1 (256 -> 64) -> InstanceNorm -> ReLU -> average pool; then Conv3d
1x1x1 (64 -> 1) whose bias starts at the mean training age; squeezed to one number per volume.
Glorot-uniform kernels, zero biases, no dropout. At width 1 it has 2,948,801 trainable parameters
whatever the input size.

Input sizes: on the 2 mm grid (91 x 109 x 91) five poolings leave 2 x 3 x 2 voxels and the final
average pool is the paper's AvgPool3d((2, 3, 2)). On 4 mm (45 x 54 x 45) or 6 mm (30 x 36 x 30)
inputs five poolings would leave one voxel or none, and instance norm over a single voxel outputs
a constant. So a block pools an axis only while that keeps at least 2 voxels, and the final pool is
an average over whatever remains (identical to the paper's at 2 mm). The parameter count does not
depend on the input size.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["BrainAgeCNN", "PAPER_CHANNELS", "count_parameters", "flops_per_volume"]

PAPER_CHANNELS: tuple[int, ...] = (32, 64, 128, 256, 256)
_HEAD_CHANNELS = 64
_NORM_EPS = 1e-3


def _pool_kernels(input_shape: tuple[int, int, int], n_blocks: int) -> list[tuple[int, int, int]]:
    """Per-block max-pool kernels: 2 on an axis while the result keeps >= 2 voxels, else 1."""
    size = list(input_shape)
    kernels = []
    for _ in range(n_blocks):
        k = tuple(2 if s // 2 >= 2 else 1 for s in size)
        size = [s // kk for s, kk in zip(size, k)]
        kernels.append(k)
    return kernels  # type: ignore[return-value]


class BrainAgeCNN(nn.Module):
    """Brain-age regression 3D-CNN of Stripelis et al. (2022).

    Parameters
    ----------
    input_shape : tuple of 3 int, default (91, 109, 91)
        Spatial size of the input volumes (each axis at least 4 voxels).
    width : float, default 1.0
        Channel multiplier (0.5 halves every layer's channels); at least one channel per layer.
    mean_age : float, default 62.68
        Initial prediction in years (the paper: UK Biobank's mean training age), set through the
        output layer's bias.
    output_scale : float, default 1.0
        Fixed (not trained) multiplier of the output layer, in years per unit. 1 is the paper. A
        value near the standard deviation of the ages (e.g. 10) lets the network reach the age range
        in a few hundred steps instead of thousands: a departure from the paper used by the CPU
        quick profile; the parameter count is unchanged.
    """

    def __init__(self, input_shape: tuple[int, int, int] = (91, 109, 91), *, width: float = 1.0,
                 mean_age: float = 62.68, output_scale: float = 1.0) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 4:
            raise ValueError(f"input_shape must be 3 sizes of at least 4 voxels, got {input_shape!r}")
        if not (width > 0):
            raise ValueError(f"width must be > 0, got {width!r}")
        if not (output_scale > 0):
            raise ValueError(f"output_scale must be > 0, got {output_scale!r}")
        self.output_scale = float(output_scale)
        self.input_shape = shape
        self.width = float(width)
        channels = [max(1, int(round(c * width))) for c in PAPER_CHANNELS]
        head = max(1, int(round(_HEAD_CHANNELS * width)))
        layers: list[tuple[str, nn.Module]] = []
        c_in = 1
        for i, (c_out, kernel) in enumerate(zip(channels, _pool_kernels(shape, len(channels))), start=1):
            layers += [(f"conv{i}", nn.Conv3d(c_in, c_out, kernel_size=3, padding=1, bias=True)),
                       (f"norm{i}", nn.InstanceNorm3d(c_out, affine=False, eps=_NORM_EPS)),
                       (f"pool{i}", nn.MaxPool3d(kernel) if kernel != (1, 1, 1) else nn.Identity()),
                       (f"relu{i}", nn.ReLU(inplace=True))]
            c_in = c_out
        layers += [("conv6", nn.Conv3d(c_in, head, kernel_size=1, bias=True)),
                   ("norm6", nn.InstanceNorm3d(head, affine=False, eps=_NORM_EPS)),
                   ("relu6", nn.ReLU(inplace=True)),
                   ("avgpool", nn.AdaptiveAvgPool3d(1)),
                   ("output", nn.Conv3d(head, 1, kernel_size=1, bias=True))]
        self.net = nn.Sequential(OrderedDict(layers))
        self.reset_parameters(mean_age=mean_age)

    def reset_parameters(self, *, mean_age: float = 62.68) -> None:
        """Glorot-uniform kernels, zero biases, initial prediction ``mean_age`` (years) through the output bias."""
        convs = [m for m in self.modules() if isinstance(m, nn.Conv3d)]
        for conv in convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        with torch.no_grad():
            convs[-1].bias.fill_(float(mean_age) / self.output_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict ages.

        Parameters
        ----------
        x : torch.Tensor of shape (batch, 1, X, Y, Z)

        Returns
        -------
        torch.Tensor of shape (batch,)
            Predicted ages in years.
        """
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected input of shape (batch, 1, X, Y, Z), got {tuple(x.shape)}")
        out = self.net(x).flatten()
        return out * self.output_scale if self.output_scale != 1.0 else out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_volume(model: BrainAgeCNN) -> int:
    """Multiply-accumulate count x 2 of the convolutions for one input volume (dense kernels).

    Counts ``2 * k^3 * c_in * c_out`` per output voxel of every Conv3d (norms, pools and ReLUs are
    negligible and left out).
    """
    flops = 0
    hooks = []

    def hook(module: nn.Conv3d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal flops
        k = module.kernel_size[0] * module.kernel_size[1] * module.kernel_size[2]
        flops += 2 * k * module.in_channels * module.out_channels * out[0, 0].numel()

    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, *model.input_shape))
    finally:
        for h in hooks:
            h.remove()
    return flops
