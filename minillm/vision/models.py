"""CIFAR-style ResNet-20/32/56 and VGG-11/16-BN, built from a JSON-able architecture spec.

Why a spec: a pruned network has arbitrary per-layer widths, so the same constructor must build the
dense net and any pruned one. ``arch_spec(model)`` reads the widths back from a (possibly pruned) model
and ``build_model(spec)`` rebuilds it, which is what lets the export be plain safetensors + JSON
instead of a pickled module. Pure torch; torchvision is not needed.

ResNet (He et al. 2016, CIFAR variant): a 3x3 stem, three stages of ``n`` basic blocks (depth 6n+2),
global average pooling, one linear layer. Stage transitions use a 1x1 conv + BN projection shortcut
("option B") rather than the paper's zero-padding shortcut ("option A"): a zero-padded identity cannot
be pruned channel-wise, a projection can, and Torch-Pruning's dependency graph traces it exactly.
Spec: ``stage_widths`` (width of each stage's residual stream) and ``block_widths`` (the inner width
of every block, per stage).

VGG-BN (Simonyan & Zisserman 2015, CIFAR variant as in network slimming): 3x3 conv-BN-ReLU layers with
max-pooling, global average pooling and one linear classifier. Spec: ``cfg``, a list of conv widths
and ``"M"`` for max-pool.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

RESNET_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}
VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}
ARCH_NAMES = sorted([*RESNET_DEPTHS, *VGG_CFGS])


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU. ``mid`` is the prunable inner width."""

    def __init__(self, in_ch: int, mid: int, out_ch: int, stride: int, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if project:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(
        self,
        stage_widths: list[int],
        block_widths: list[list[int]],
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(stage_widths) != len(block_widths):
            raise ValueError("stage_widths and block_widths must have one entry per stage")
        self.conv1 = nn.Conv2d(in_channels, stage_widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_widths[0])
        stages = []
        in_ch = stage_widths[0]
        for s, (width, mids) in enumerate(zip(stage_widths, block_widths, strict=True)):
            blocks = []
            for b, mid in enumerate(mids):
                project = s > 0 and b == 0  # fixed by structure, not by widths: see module docstring
                blocks.append(BasicBlock(in_ch, mid, width, 2 if project else 1, project))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            x = stage(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class VGG(nn.Module):
    def __init__(self, cfg: list[int | str], in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                width = int(v)
                layers += [nn.Conv2d(ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                ch = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit BN: the usual CIFAR recipe. Uses torch's default RNG; callers that
    need a reproducible init wrap construction in ``torch.random.fork_rng`` (see ``build_model``)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def default_spec(arch: str, in_channels: int = 3, num_classes: int = 10) -> dict[str, Any]:
    """The dense spec of a named architecture (``resnet20``, ``vgg16`` ...)."""
    if arch in RESNET_DEPTHS:
        n = RESNET_DEPTHS[arch]
        widths = [16, 32, 64]
        return {
            "arch": "resnet",
            "name": arch,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "stage_widths": widths,
            "block_widths": [[w] * n for w in widths],
        }
    if arch in VGG_CFGS:
        return {
            "arch": "vgg",
            "name": arch,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "cfg": list(VGG_CFGS[arch]),
        }
    raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCH_NAMES)}")


def build_model(spec: dict[str, Any], seed: int | None = None) -> nn.Module:
    """Build a network from its spec. ``seed`` makes the random init reproducible without touching
    the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.random.manual_seed(seed)  # local to the forked RNG state
        if spec["arch"] == "resnet":
            return CifarResNet(
                list(spec["stage_widths"]),
                [list(b) for b in spec["block_widths"]],
                spec["in_channels"],
                spec["num_classes"],
            )
        if spec["arch"] == "vgg":
            return VGG(list(spec["cfg"]), spec["in_channels"], spec["num_classes"])
    raise ValueError(f"unknown arch family {spec['arch']!r} in spec")


def arch_spec(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """Read the spec (with the current, possibly pruned, widths) back from a model."""
    if isinstance(model, CifarResNet):
        stages = list(model.stages)
        return {
            "arch": "resnet",
            "name": name or f"resnet{6 * len(stages[0]) + 2}",
            "in_channels": model.conv1.in_channels,
            "num_classes": model.fc.out_features,
            "stage_widths": [stage[0].conv2.out_channels for stage in stages],
            "block_widths": [[blk.conv1.out_channels for blk in stage] for stage in stages],
        }
    if isinstance(model, VGG):
        cfg: list[int | str] = []
        in_ch = None
        for m in model.features:
            if isinstance(m, nn.MaxPool2d):
                cfg.append("M")
            elif isinstance(m, nn.Conv2d):
                in_ch = m.in_channels if in_ch is None else in_ch
                cfg.append(m.out_channels)
        return {
            "arch": "vgg",
            "name": name or "vgg",
            "in_channels": in_ch,
            "num_classes": model.classifier.out_features,
            "cfg": cfg,
        }
    raise TypeError(f"no architecture spec for {type(model).__name__}")
