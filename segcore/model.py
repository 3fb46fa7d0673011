"""U-Net and UNet 3+ segmentation models with configurable depth and width; build_model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segcore.config import ARCHS

MAX_DEPTH = 6


def _require_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise ValueError naming `name` unless `value` is an int in [low, high]."""
    # bool is an int subclass; True as a depth is almost certainly a config mistake.
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and (high is None or value <= high):
        return
    rule = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    raise ValueError(f"{name}: must be {rule}, got {value!r}")


def stage_widths(depth: int, base_width: int, max_width: int) -> list[int]:
    """Channel widths of the depth+1 encoder stages: min(base_width * 2**i, max_width)."""
    return [min(base_width * 2**i, max_width) for i in range(depth + 1)]


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 conv (no bias, BN follows) + BatchNorm + ReLU: (B, in_ch, H, W) -> (B, out_ch, H, W)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """Two conv_bn_relu blocks: (B, in_ch, H, W) -> (B, out_ch, H, W)."""
    return nn.Sequential(conv_bn_relu(in_ch, out_ch), conv_bn_relu(out_ch, out_ch))


class _SegNet(nn.Module):
    """Shared argument checks, encoder and input-size check for UNet and UNet3Plus."""

    def __init__(
        self, in_channels: int, num_classes: int, depth: int, base_width: int, max_width: int = 512
    ) -> None:
        super().__init__()
        _require_int("in_channels", in_channels, 1)
        _require_int("num_classes", num_classes, 1)
        _require_int("depth", depth, 1, MAX_DEPTH)
        _require_int("base_width", base_width, 1)
        _require_int("max_width", max_width, 1)
        if max_width < base_width:
            # A cap below base_width would silently shrink every stage; treat it as a config error.
            raise ValueError(f"max_width: must be >= base_width ({base_width}), got {max_width}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        self.multiple = 2**depth
        self.widths = stage_widths(depth, base_width, max_width)
        ins = [in_channels, *self.widths[:-1]]
        self.encoder = nn.ModuleList(
            double_conv(i, o) for i, o in zip(ins, self.widths, strict=True)
        )
        self.pool = nn.MaxPool2d(2)

    def _init_weights(self) -> None:
        """Kaiming-normal init for convs (ReLU network); BN keeps its default weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> depth+1 features, stage i of shape (B, widths[i], H/2**i, W/2**i)."""
        if x.dim() != 4:
            raise ValueError(f"input must be a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        m = self.multiple
        if h % m or w % m:
            # Checked up front: otherwise pooling floors the size and the skip concat fails later
            # with an opaque shape error deep inside the decoder.
            raise ValueError(
                f"input size {h}x{w} is not divisible by 2**depth = {m} (depth {self.depth}); "
                f"use patch and tile sizes that are multiples of {m}"
            )
        feats = [self.encoder[0](x)]
        for stage in self.encoder[1:]:
            feats.append(stage(self.pool(feats[-1])))
        return feats


class UNet(_SegNet):
    """Classic U-Net: (B, in_channels, H, W) -> logits (B, num_classes, H, W)."""

    def __init__(
        self, in_channels: int, num_classes: int, depth: int, base_width: int, max_width: int = 512
    ) -> None:
        super().__init__(in_channels, num_classes, depth, base_width, max_width)
        w = self.widths
        # up[i] / dec[i] produce decoder scale i from scale i+1; bias is off in the transposed
        # conv because a conv + BN follows, which would cancel it.
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(w[i + 1], w[i], kernel_size=2, stride=2, bias=False)
            for i in range(depth)
        )
        self.dec = nn.ModuleList(double_conv(2 * w[i], w[i]) for i in range(depth))
        self.head = nn.Conv2d(w[0], num_classes, kernel_size=1)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) float -> logits (B, num_classes, H, W); H, W % 2**depth == 0."""
        feats = self._encode(x)
        y = feats[-1]
        for i in reversed(range(self.depth)):
            y = self.dec[i](torch.cat([feats[i], self.up[i](y)], dim=1))
        return self.head(y)


class _FullScaleNode(nn.Module):
    """UNet 3+ decoder node at `scale`: fuses all depth+1 scales into (depth+1)*cat_width ch."""

    def __init__(self, scale: int, in_widths: list[int], cat_width: int) -> None:
        super().__init__()
        self.scale = scale
        # One branch per source scale j (0..depth): encoder j for j <= scale, else decoder j.
        self.branches = nn.ModuleList(conv_bn_relu(c, cat_width) for c in in_widths)
        self.fuse = conv_bn_relu(cat_width * len(in_widths), cat_width * len(in_widths))

    def forward(self, sources: list[torch.Tensor]) -> torch.Tensor:
        """sources[j]: (B, C_j, H/2**j, W/2**j), j=0..depth -> (B, node width, H/2**s, W/2**s)."""
        s = self.scale
        size = sources[s].shape[-2:]
        parts = []
        for j, (branch, src) in enumerate(zip(self.branches, sources, strict=True)):
            if j < s:
                # Single pool with a 2**k kernel: no chain of intermediate tensors to keep.
                src = F.max_pool2d(src, kernel_size=2 ** (s - j))
            elif j > s:
                src = F.interpolate(src, size=size, mode="bilinear", align_corners=False)
            parts.append(branch(src))
        return self.fuse(torch.cat(parts, dim=1))


class UNet3Plus(_SegNet):
    """UNet 3+ (Huang et al. 2020), no deep supervision: (B, C, H, W) -> (B, num_classes, H, W)."""

    def __init__(
        self, in_channels: int, num_classes: int, depth: int, base_width: int, max_width: int = 512
    ) -> None:
        super().__init__(in_channels, num_classes, depth, base_width, max_width)
        self.cat_width = base_width
        self.node_width = (depth + 1) * base_width
        w = self.widths
        # dec[s] is the node at scale s; deeper sources are decoder nodes, except the bottom
        # (scale depth), which is the last encoder stage.
        self.dec = nn.ModuleList(
            _FullScaleNode(
                s, w[: s + 1] + [self.node_width] * (depth - 1 - s) + [w[-1]], base_width
            )
            for s in range(depth)
        )
        self.head = nn.Conv2d(self.node_width, num_classes, kernel_size=1)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) float -> logits (B, num_classes, H, W); H, W % 2**depth == 0."""
        enc = self._encode(x)
        dec: list[torch.Tensor] = [enc[-1]]  # dec[k] is the output at scale depth - k
        for s in reversed(range(self.depth)):
            dec.append(self.dec[s](enc[: s + 1] + dec[::-1]))
        return self.head(dec[-1])


def build_model(
    arch: str, in_channels: int, num_classes: int, depth: int, base_width: int, max_width: int = 512
) -> nn.Module:
    """Build a UNet or UNet3Plus mapping (B, in_channels, H, W) to logits (B, num_classes, H, W)."""
    # Tuple membership (not a dict lookup) so an unhashable arch still gets the ValueError.
    if arch not in ARCHS:
        raise ValueError(f"arch: unknown architecture {arch!r}; choose unet or unet3plus")
    cls = UNet if arch == "unet" else UNet3Plus
    return cls(in_channels, num_classes, depth, base_width, max_width)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (requires_grad) in `model`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
