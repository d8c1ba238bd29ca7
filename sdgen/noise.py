"""Starting noise and the random generators samplers draw from, in the two seed modes.

reference: one generator on the generation device, seeded once per run; each batch's noise is drawn in
    one call (or once for the whole run with --fixed_code), in the reference scripts' order, so the same
    seed gives the reference's images. img2img's VAE posterior sample is drawn once per run, first, from
    the CPU generator (the reference's DiagonalGaussianDistribution.sample draws on the CPU).
per-image: image k of a run uses seed + k on a CPU generator, so any image can be made again alone, on
    any machine, from the seed written in its PNG. For one image on the CPU the two modes coincide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchNoise:
    start: torch.Tensor  # the sampler's starting noise (txt2img) or forward-process noise (img2img)
    generators: object  # what the sampler's own draws use: one generator, or one per image
    seeds: list[int]  # each image's seed as written in its metadata
    extra: torch.Tensor | None = None  # noise drawn before `start` (img2img: the VAE posterior sample)


@dataclass
class NoiseSource:
    seed: int
    mode: str  # "reference" or "per-image"
    device: torch.device
    shape: tuple[int, ...]  # one image's noise shape (latent C, h, w)
    fixed_code: bool = False
    extra_shape: tuple[int, ...] | None = None  # shape of the noise drawn before the start noise

    def __post_init__(self) -> None:
        self._generator: torch.Generator | None = None
        self._cpu_generator: torch.Generator | None = None
        self._fixed: torch.Tensor | None = None
        self._extra: torch.Tensor | None = None
        if self.mode == "reference":
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
            # On the CPU the reference's CPU draws and device draws come from one and the same generator.
            cpu = self.device.type == "cpu"
            self._cpu_generator = self._generator if cpu else torch.Generator().manual_seed(self.seed)

    def start(self, n_samples: int) -> None:
        """Once, before the first batch: the reference draws the VAE posterior sample and the
        --fixed_code start code here."""
        if self.mode != "reference":
            return
        if self.extra_shape is not None:
            self._extra = torch.randn((n_samples, *self.extra_shape), generator=self._cpu_generator).to(self.device)
        if self.fixed_code:
            self._fixed = self._draw(n_samples)

    def snapshot(self) -> object:
        """The generator state, to redo a batch with the same numbers (after an OOM or an overflow)."""
        return self._generator.get_state() if self._generator is not None else None

    def restore(self, state: object) -> None:
        if state is not None and self._generator is not None:
            self._generator.set_state(state)  # type: ignore[arg-type]  # what snapshot() returned

    def _draw(self, batch: int) -> torch.Tensor:
        return torch.randn((batch, *self.shape), generator=self._generator, device=self.device)

    def batch(self, seeds: tuple[int, ...]) -> BatchNoise:
        """Noise for one batch; ``seeds`` are its images' seeds from the job plan (:mod:`sdgen.jobs`), which
        per-image mode seeds one CPU generator each with."""
        batch = len(seeds)
        if self.mode == "reference":
            start = self._fixed[:batch] if self._fixed is not None else self._draw(batch)
            extra = self._extra[:batch] if self._extra is not None else None
            return BatchNoise(start, self._generator, list(seeds), extra)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        extra = None
        if self.extra_shape is not None:
            extra = torch.cat([torch.randn((1, *self.extra_shape), generator=g) for g in generators])
            extra = extra.to(self.device)
        start = torch.cat([torch.randn((1, *self.shape), generator=g) for g in generators])
        return BatchNoise(start.to(self.device), generators, list(seeds), extra)


def drawer(generators: object, device: torch.device):
    """A function drawing one standard-normal tensor of a batch's shape from the batch's generator(s):
    the reference's noise_like (one generator, one call) or one draw per image from its own generator."""
    if isinstance(generators, list):

        def draw(shape: tuple) -> torch.Tensor:
            return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators]).to(device)
    else:

        def draw(shape: tuple) -> torch.Tensor:
            return torch.randn(shape, generator=generators, device=device)  # type: ignore[call-overload]

    return draw
