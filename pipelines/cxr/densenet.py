"""DenseNet-121 in plain PyTorch with torchvision's state_dict key names.

Both public checkpoints we import (torchxrayvision and jrzech/reproduce-chexnet) derive from
torchvision's DenseNet, but torchvision cannot be installed beside the pinned torch here, and the
node must not need either project's code at run time. So the architecture is rebuilt here, key for
key, and ``CXRExport`` adds what the pipeline needs from the ONNX file: sigmoid probabilities and
class activation maps from the last feature layer as a second output.

Only ``node.weights`` (import) and tests import this module; the pipeline itself needs only ONNX.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(self.relu2(self.norm2(out)))
        return torch.cat([x, out], 1)


class _DenseBlock(nn.Sequential):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                              bn_size))


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1,
                                          bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet121(nn.Module):
    """torchvision-layout DenseNet-121.

    ``sigmoid_head=True`` gives CheXNet's ``classifier = Sequential(Linear, Sigmoid)`` (keys
    ``classifier.0.*``, forward returns probabilities); False gives torchxrayvision's plain Linear
    (keys ``classifier.*``, forward returns logits, as xrv does without op_threshs).
    """

    def __init__(self, num_classes: int, in_channels: int = 1, sigmoid_head: bool = False,
                 growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        n = num_init_features
        for i, layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(layers, n, bn_size, growth_rate))
            n += layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(n, n // 2))
                n //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(n))
        self.num_features = n
        self.sigmoid_head = sigmoid_head
        linear = nn.Linear(n, num_classes)
        self.classifier: nn.Module = nn.Sequential(linear, nn.Sigmoid()) if sigmoid_head else linear
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    @property
    def linear(self) -> nn.Linear:
        return self.classifier[0] if isinstance(self.classifier, nn.Sequential) else self.classifier  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.relu(self.features(x))
        pooled = torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1)
        return self.classifier(pooled)


class CXRExport(nn.Module):
    """What goes into the ONNX file: (probabilities (N, L), cam (N, L, h, w)).

    The CAM is W_l · relu(features) per pixel (bias left out), so its spatial mean plus the bias is
    exactly the label's logit: the map explains the score the pipeline reports.
    """

    def __init__(self, net: DenseNet121):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = F.relu(self.net.features(x))
        pooled = torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1)
        lin = self.net.linear
        probs = torch.sigmoid(lin(pooled))
        cam = torch.einsum("lc,nchw->nlhw", lin.weight, f)
        return probs, cam


def reference_probabilities(net: DenseNet121, x: torch.Tensor) -> torch.Tensor:
    """The source project's own forward, turned into probabilities: the parity baseline."""
    out = net(x)
    return out if net.sigmoid_head else torch.sigmoid(out)
