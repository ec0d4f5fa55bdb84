"""Small models that ship with lorakit (no weights to download)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNet(nn.Module):
    """The small ConvNet of the from-scratch LoRA walkthrough: two 5×5 convolutions with max-pooling,
    then fc1 (400→120), fc2 (120→84), fc3 (84→classes). `conv3` is defined but unused, as there.

    x: (N, in_channels, 32, 32) → logits (N, classes). 28×28 images are padded to 32×32 first."""

    def __init__(self, in_channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.conv3 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 28:
            x = F.pad(x, (2, 2, 2, 2))  # (N, C, 32, 32)
        x = self.pool(F.relu(self.conv1(x)))  # (N, 6, 14, 14)
        x = self.pool(F.relu(self.conv2(x)))  # (N, 16, 5, 5)
        x = torch.flatten(x, 1)  # (N, 400)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
