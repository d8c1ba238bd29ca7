"""A generation spec as a list of work items: each batch with the global index of its first image, its
prompts and its images' seeds. One GPU runs them in order; several GPUs or machines can share them out and
still write the same images (per-image seeds depend only on the global index)."""

from __future__ import annotations

from dataclasses import dataclass

from sdgen.specs import MAX_SEED, GenerationSpec

SEED_RANGE = MAX_SEED + 1


@dataclass(frozen=True)
class WorkItem:
    index: int  # global index of the item's first image in the run
    batch: int  # the item's number, as the reference's n_iter loop counts
    prompts: tuple[str, ...]  # one per image
    seeds: tuple[int, ...]  # one per image, as written into its PNG
    input_index: int | None = None  # upscale: which input image


def plan(spec: GenerationSpec) -> list[WorkItem]:
    """The reference's batching: one prompt -> n_samples copies per batch; a prompt file -> its lines in
    chunks of n_samples (the last chunk may be smaller); the whole plan runs n_iter times. Upscale: one
    item per input image."""
    chunks: list[tuple[str, ...]]
    if spec.upscale is not None:
        chunks = [(spec.prompts[0],)] * len(spec.upscale.images)
    elif spec.from_file:
        n = spec.n_samples
        chunks = [tuple(spec.prompts[i : i + n]) for i in range(0, len(spec.prompts), n)] * spec.n_iter
    else:
        chunks = [(spec.prompts[0],) * spec.n_samples] * spec.n_iter
    items, index = [], 0
    for number, prompts in enumerate(chunks):
        items.append(
            WorkItem(
                index=index,
                batch=number,
                prompts=prompts,
                seeds=_seeds(spec, index, len(prompts)),
                input_index=number if spec.upscale is not None else None,
            )
        )
        index += len(prompts)
    return items


def _seeds(spec: GenerationSpec, index: int, count: int) -> tuple[int, ...]:
    """per-image: seed + global index (--fixed_code: every batch reuses the first batch's seeds; an upscale
    input k uses seed + k). reference: the run's one seed for every image."""
    if spec.seed_mode == "reference":
        return (spec.seed,) * count
    base = 0 if spec.fixed_code and spec.upscale is None else index
    # modulo 2**32: past 4294967295 the seeds go on from 0, so every PNG's Seed is one --seed accepts and
    # makes that image again
    return tuple((spec.seed + base + i) % SEED_RANGE for i in range(count))
