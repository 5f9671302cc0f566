"""data.positive_fraction: the sampler's rate, determinism, DDP sharding."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader, TensorDataset

from ptxseg.config import load_config
from ptxseg.data.records import Record
from ptxseg.data.sampler import PositiveFractionSampler, sampler_for
from ptxseg.errors import ConfigError


def _labels(n=100, n_pos=20):
    return [i < n_pos for i in range(n)]


def _within_binomial(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.8])
def test_rate_within_a_binomial_bound_over_many_draws(fraction):
    labels = _labels(200, 30)  # natural rate 0.15
    sampler = PositiveFractionSampler(labels, fraction, seed=3)
    assert len(sampler) == 200  # an epoch = the dataset's length
    draws = np.concatenate([np.fromiter(sampler, int) for _ in range(100)])  # 100 epochs
    assert draws.size == 20_000 and draws.min() >= 0 and draws.max() < 200
    n_pos = int(np.sum(np.asarray(labels)[draws]))
    assert _within_binomial(n_pos, draws.size, fraction)
    # and per epoch, each within its own (wider) bound
    for epoch in range(100):
        e = draws[epoch * 200:(epoch + 1) * 200]
        assert _within_binomial(int(np.sum(np.asarray(labels)[e])), 200, fraction, 5.5)
    # within each class every image is drawn, at about the same rate
    counts = Counter(draws.tolist())
    assert set(counts) == set(range(200))
    pos_counts = np.array([counts[i] for i in range(30)])
    expected = n_pos / 30
    assert np.all(np.abs(pos_counts - expected) <= 6 * math.sqrt(expected))


def test_deterministic_by_seed_and_epoch():
    labels = _labels()
    a = PositiveFractionSampler(labels, 0.5, seed=7)
    b = PositiveFractionSampler(labels, 0.5, seed=7)
    first, second = list(a), list(a)  # without set_epoch: the next epoch each time
    assert first == list(b) and second == list(b)
    assert first != second
    b.set_epoch(0)
    assert list(b) == first  # set_epoch replays an epoch exactly (a resumed run)
    b.set_epoch(1)
    assert list(b) == second
    assert list(PositiveFractionSampler(labels, 0.5, seed=8)) != first
    assert np.array_equal(a.draw(5), b.draw(5))


def test_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.positive_fraction=0.5: the training images have "
                       "no positive image"):
        PositiveFractionSampler([False] * 5, 0.5)
    with pytest.raises(ConfigError, match="no negative image"):
        PositiveFractionSampler([True] * 5, 0.5)
    with pytest.raises(ConfigError, match="must be in \\(0, 1\\)"):
        PositiveFractionSampler(_labels(), 1.0)


def test_config_key_and_records():
    assert load_config("paper").data.positive_fraction is None
    assert load_config("paper", ["data.positive_fraction=0.6"]).data.positive_fraction == 0.6
    with pytest.raises(ConfigError, match="'data.positive_fraction'"):
        load_config("paper", ["data.positive_fraction=1.5"])
    recs = [Record(f"r{i}", Path("x.png"), Path("m.png"), i % 4 == 0) for i in range(40)]
    assert sampler_for(recs, None, 0) is None
    s = sampler_for(recs, 0.5, 0)
    assert list(s.positives) == list(range(0, 40, 4)) and len(s) == 40


def test_works_in_a_dataloader():
    labels = _labels(40, 8)
    ds = TensorDataset(torch.arange(40))
    loader = DataLoader(ds, batch_size=8, sampler=PositiveFractionSampler(labels, 0.5, seed=1),
                        drop_last=True)
    seen = torch.cat([b[0] for b in loader])
    assert seen.numel() == 40
    loader.sampler.set_epoch(0)
    assert seen.tolist() == loader.sampler.draw(0).tolist()


def test_ddp_sharding_through_lightnings_wrapper():
    """What Lightning does under DDP (use_distributed_sampler=True): wrap the sampler, call
    set_epoch on the wrapper (forwarded), each rank takes its share of the same draw."""
    labels = _labels(101, 20)
    for epoch in (0, 3):
        shards = []
        for rank in range(2):
            inner = PositiveFractionSampler(labels, 0.5, seed=4)
            wrapper = DistributedSamplerWrapper(inner, num_replicas=2, rank=rank, shuffle=True)
            wrapper.set_epoch(epoch)
            shards.append(list(wrapper))
            assert len(shards[-1]) == len(wrapper) == 51  # ceil(101 / 2)
        draw = PositiveFractionSampler(labels, 0.5, seed=4).draw(epoch).tolist()
        both = Counter(shards[0] + shards[1])
        # the two ranks together: the epoch's draw (plus the one index DDP pads with)
        assert sum(both.values()) == 102
        assert not Counter(draw) - both and sum((both - Counter(draw)).values()) == 1


def test_the_training_loader_draws_positives_at_the_configured_rate(tmp_path, synth_data):
    """Through train.prepare: the training loader's index stream (the batches it yields) is the
    sampler's draw, positives at data.positive_fraction; without it, a plain shuffle at the
    natural rate. The validation loader is never resampled."""
    from ptxseg.train import prepare
    from tests.conftest import tiny_config

    def positives(loader, epochs):
        labels = [bool(r.has_pneumothorax) for r in loader.dataset.records]
        n = pos = 0
        for epoch in range(epochs):
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
            for batch in loader.batch_sampler:
                n += len(batch)
                pos += sum(labels[i] for i in batch)
        return n, pos, labels

    cfg = tiny_config(**{"data.positive_fraction": 0.8, "train.seed": 3})
    training = prepare(cfg, synth_data, tmp_path / "a", progress=False)
    train_loader, val_loader = training.loaders
    sampler = train_loader.sampler
    assert isinstance(sampler, PositiveFractionSampler)
    assert (sampler.fraction, sampler.seed) == (0.8, 3)
    n, pos, labels = positives(train_loader, 200)
    assert 0.3 < sum(labels) / len(labels) < 0.7  # the natural rate is far from 0.8
    assert n == 200 * (len(labels) // 4 * 4) and _within_binomial(pos, n, 0.8)
    assert not isinstance(val_loader.sampler, PositiveFractionSampler)
    plain = prepare(tiny_config(), synth_data, tmp_path / "b", progress=False).loaders[0]
    assert not isinstance(plain.sampler, PositiveFractionSampler)
    n, pos, labels = positives(plain, 20)
    assert pos / n == pytest.approx(sum(labels) / len(labels), abs=0.1)
