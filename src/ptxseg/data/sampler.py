"""``data.positive_fraction``: show images with pneumothorax at a chosen rate.

:class:`PositiveFractionSampler` draws an epoch of ``num_samples`` indices (default: the
dataset's length) with replacement: each draw is a positive image with probability
``fraction`` (so the epoch holds ``Binomial(num_samples, fraction)`` positives), chosen
uniformly among the positives, else one chosen uniformly among the negatives. With the
natural rate ``fraction = n_pos / n`` this is plain sampling with replacement.

Determinism: the draw of epoch ``e`` depends only on ``(seed, e)``. Lightning calls
:meth:`~PositiveFractionSampler.set_epoch` before each epoch (also on a resumed run, which
therefore draws exactly what an uninterrupted run would); without it each new iteration
moves on to the next epoch's draw.

Multi-GPU (DDP): give the sampler to the training DataLoader as is and keep Lightning's
``use_distributed_sampler=True`` (its default). Lightning then wraps it in its
``DistributedSamplerWrapper``, which forwards ``set_epoch`` to it: every process draws the
same epoch (same seed and epoch) and takes its own ``1/world_size`` share of it, so the
positive rate holds on every device and the epoch is ``num_samples`` draws in all (each
device sees ``ceil(num_samples / world_size)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ptxseg.data.records import Record
from ptxseg.errors import ConfigError


class PositiveFractionSampler(Sampler[int]):
    """Indices of a dataset, positives drawn at rate ``fraction``.

    Args:
        labels: per dataset item, whether it shows a pneumothorax.
        fraction: wanted share of positive draws, in (0, 1).
        seed: the draws of epoch ``e`` depend on ``(seed, e)`` only.
        num_samples: draws per epoch; default ``len(labels)``.

    Raises:
        ConfigError: a fraction outside (0, 1), or labels of one class only (the rate cannot be
            met: names ``data.positive_fraction``).
    """

    def __init__(
        self,
        labels: Sequence[bool],
        fraction: float,
        seed: int = 0,
        num_samples: int | None = None,
    ):
        if not 0.0 < float(fraction) < 1.0:
            raise ConfigError(f"data.positive_fraction: must be in (0, 1), got {fraction}")
        flags = np.asarray([bool(v) for v in labels], bool)
        self.positives = np.flatnonzero(flags)
        self.negatives = np.flatnonzero(~flags)
        for name, group in (("positive", self.positives), ("negative", self.negatives)):
            if group.size == 0:
                raise ConfigError(
                    f"data.positive_fraction={fraction}: the training images have no {name} "
                    "image, so this rate cannot be shown (set it to null)"
                )
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.num_samples = len(flags) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose draw the next iteration yields."""
        self.epoch = int(epoch)

    def draw(self, epoch: int) -> np.ndarray:
        """The indices of epoch ``epoch`` (does not change the sampler).

        Shape:
            - returns ``(num_samples,)`` int64
        """
        rng = np.random.default_rng([self.seed, int(epoch)])
        positive = rng.random(self.num_samples) < self.fraction
        pos = self.positives[rng.integers(0, self.positives.size, self.num_samples)]
        neg = self.negatives[rng.integers(0, self.negatives.size, self.num_samples)]
        return np.where(positive, pos, neg).astype(np.int64)

    def __iter__(self) -> Iterator[int]:
        indices = self.draw(self.epoch)
        self.epoch += 1
        return iter(indices.tolist())

    def __len__(self) -> int:
        return self.num_samples


def sampler_for(
    records: Sequence[Record], fraction: float | None, seed: int
) -> PositiveFractionSampler | None:
    """The training sampler for ``data.positive_fraction`` (``None``: the natural rate, i.e.
    the loader's plain shuffle). Labels come from the records (``has_pneumothorax``)."""
    if fraction is None:
        return None
    return PositiveFractionSampler([bool(r.has_pneumothorax) for r in records], fraction, seed)
