"""sdgen's own networks (UNet, VAE, CLIP text transformer) in plain torch, named as the checkpoints name them."""

from __future__ import annotations

from torch import nn


class Embedding(nn.Embedding):
    """nn.Embedding without its random initialisation. The networks are built on the meta device and every
    weight comes from the checkpoint; nn.Embedding's ``normal_`` on the meta device runs through torch._refs,
    which imports torch._dynamo (2 s of a 4 s start-up on the 2-core CI machine)."""

    def reset_parameters(self) -> None:
        pass
