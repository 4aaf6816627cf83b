"""Examples for the training loop: a source with its transform as a torch dataset, and the batches.

Map-style sources (folder, manifest, dataset saved with ``save_to_disk``) go through
:class:`TrainingDataset` (random access, shuffled with :func:`~.seeds.epoch_order`) or, in the trainer,
:class:`EpochIndexed` read in the order of :class:`RankPositions`; streaming sources (``hf://`` hub datasets,
tar shards) through :class:`StreamingDataset`. Random crops and flips are drawn from a generator seeded from
(seed, epoch, index), so a resumed run reproduces them exactly. :func:`collate` drops the skipped examples
from a batch and lists them. Before a run, :func:`first_usable` makes sure the data holds at least one batch
of readable examples (reading only as far as it must).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import InputError
from .data import Sample, Source
from .faces import decode_face
from .seeds import epoch_order, example_generator, step_generator
from .transform import Transform, decode_sample

NAMED = 3  # unreadable examples named in the message of too little data


class TrainingDataset(torch.utils.data.Dataset):
    """A map-style source with its transform; item i's crop/flip is seeded from (seed, epoch, i)."""

    def __init__(self, source: Source, transform: Transform, seed: int = 0) -> None:
        if source.streaming:
            raise TypeError(f"dataset '{source.spec}' is streamed; use StreamingDataset")
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the random crops and flips are drawn for."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.transform(self.source[i], example_generator(self.seed, self.epoch, i))


class StreamingDataset(torch.utils.data.IterableDataset):
    """The stream's examples rank, rank + world_size, ... forever, skipping this rank's first ``start``.

    Each example's crop/flip is seeded from (seed, epoch, position in the stream). With several DataLoader
    workers, worker w of k takes every k-th of this rank's examples (after ``start``): nothing is repeated,
    but batches interleave, so exact resume needs ``num_workers`` <= 1.
    """

    def __init__(
        self,
        source: Source,
        transform: Transform,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range for world_size {world_size}")
        if start < 0:
            raise ValueError(f"start {start} is negative")
        self.source, self.transform, self.seed = source, transform, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def _positions(self) -> Iterator[tuple[int, int, Sample]]:
        """(epoch, position, sample) of this rank's examples, forever, from this rank's ``start``-th."""
        epoch, skip = 0, self.start
        if not self.source.streaming:  # jump straight to the resume point
            n = len(self.source)
            per_epoch = len(range(self.rank, n, self.world_size))
            if per_epoch == 0:
                raise self._too_small(n)
            epoch, skip = divmod(skip, per_epoch)
            while True:
                for position in range(self.rank + skip * self.world_size, n, self.world_size):
                    yield epoch, position, self.source[position]
                epoch, skip = epoch + 1, 0
        while True:
            seen = mine = 0
            for position, sample in enumerate(self.source):
                seen = position + 1
                if position % self.world_size != self.rank:
                    continue
                mine += 1
                if skip:
                    skip -= 1
                    continue
                yield epoch, position, sample
            if mine == 0:
                raise self._too_small(seen)
            epoch += 1

    def _too_small(self, n: int) -> InputError:
        if n == 0:
            return InputError(f"dataset '{self.source.spec}' is empty; expected image–caption pairs")
        return InputError(
            f"dataset '{self.source.spec}' has {n} examples, fewer than the {self.world_size} training "
            "processes; add data or use fewer processes"
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for count, (epoch, position, sample) in enumerate(self._positions()):
            if count % workers == worker:
                yield self.transform(sample, example_generator(self.seed, epoch, position))


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the usable examples into a batch; skipped ones are listed under ``"skipped"`` as (key, reason)."""
    good = [e for e in examples if "skipped" not in e]
    batch: dict[str, Any] = {
        "texts": [e["text"] for e in good],
        "keys": [e["key"] for e in good],
        "skipped": [(e["key"], e["skipped"]) for e in examples if "skipped" in e],
    }
    if good:  # every tensor field: images, or cached latents/features, and the SDXL size ids
        for name, value in good[0].items():
            if isinstance(value, torch.Tensor):
                batch[name] = torch.stack([e[name] for e in good])
    return batch


class EpochIndexed(torch.utils.data.Dataset):
    """Map-style examples addressed by (epoch, index): crops/flips seeded from both, so resume repeats them."""

    def __init__(self, source: Any, transform: Any, seed: int) -> None:
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        return self.transform(self.source[index], step_generator(self.seed, 7, epoch, index))


class RankPositions(torch.utils.data.Sampler):
    """(epoch, index) keys of this rank's examples from ``start`` on, forever: each epoch a seeded permutation,
    consecutive ``batch``-sized slices dealt round-robin to the ranks."""

    def __init__(self, n: int, seed: int, rank: int, world: int, batch: int, start: int) -> None:
        self.n, self.seed, self.rank, self.world, self.batch, self.start = n, seed, rank, world, batch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # this rank's k-th example is global example (k // batch * world + rank) * batch + k % batch
        k = self.start
        orders: dict[int, list[int]] = {}
        while True:
            q = (k // self.batch * self.world + self.rank) * self.batch + k % self.batch
            epoch, pos = divmod(q, self.n)
            if epoch not in orders:
                orders = {epoch: epoch_order(self.n, self.seed, epoch)}
            yield epoch, orders[epoch][pos]
            k += 1

    def __len__(self) -> int:  # endless; DataLoader only needs a number for its length hint
        return 2**31


def _clause(reason: str) -> str:
    """A skip reason shortened for a list: without its "training image '<path>': " label and its advice."""
    reason = re.sub(r"^training image( '[^']*')?:? ", "", reason)
    return reason.split("; ")[0][:160]


def first_usable(
    source: Source, batch_size: int, processes: int, face_crops: bool | None = None
) -> list[Sample]:
    """The first ``batch_size`` x ``processes`` readable samples of ``source`` (one batch of every process),
    read from its start: a healthy source costs one batch of decodes, a streamed one is read from its
    beginning. A source with fewer (all of it read) is an :class:`InputError` saying what was found.
    ``face_crops`` (FaceID runs; None elsewhere): each sample's face must be readable too (with its crop)."""
    needed = batch_size * processes
    usable: list[Sample] = []
    problems: list[tuple[str, str]] = []
    read = unusable = 0
    for sample in source:
        read += 1
        image, reason = decode_sample(sample)
        if image is not None and face_crops is not None:
            face, reason = decode_face(sample.face, face_crops)
            image = image if face is not None else None
        if image is None:
            unusable += 1
            if len(problems) < NAMED:
                problems.append((sample.key, reason))
            continue
        usable.append(sample)
        if len(usable) >= needed:
            return usable
    if read == 0:
        raise InputError(f"dataset '{source.spec}' is empty; expected image–caption pairs")
    named = "; ".join(f"{key}: {_clause(reason)}" for key, reason in problems)
    listed = f" (first problems: {named}{'; ...' if unusable > len(problems) else ''})" if problems else ""
    fixes = ["replace or remove the unreadable files"] if problems else []
    fixes.append("add images")
    if len(usable) >= processes:
        fixes.append(f"lower --batch-size to at most {len(usable) // processes}")
    todo = ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1]
    batch = f"one batch: --batch-size {batch_size} x {processes} process{'es' if processes > 1 else ''}"
    raise InputError(
        f"dataset '{source.spec}': {len(usable)} of {read} training images could be read{listed}; "
        f"expected at least {needed} ({batch}); {todo}"
    )
