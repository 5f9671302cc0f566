"""How DataLoader workers start (issue 11, items 3-4): forkserver with CUDA (no fork of a
multi-threaded CUDA process), fork on the CPU; what they get pickles; they start once."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ptxseg import hardware
from ptxseg.data.dataset import SegDataset
from ptxseg.data.sources import load_records
from tests.conftest import tiny_config


def test_the_start_method_is_chosen_per_device(monkeypatch):
    import multiprocessing

    assert hardware.worker_start_method("cuda") == "forkserver"
    assert hardware.worker_start_method("cpu") == "fork"
    assert hardware.worker_start_method("mps") == "fork"
    cuda = hardware.loader_kwargs("cuda", 2)
    assert cuda["multiprocessing_context"].get_start_method() == "forkserver"
    assert cuda["pin_memory"] is True and cuda["prefetch_factor"] == 4
    assert hardware.loader_kwargs("cpu", 2)["multiprocessing_context"].get_start_method() == (
        "fork")
    assert hardware.loader_kwargs("cuda", 0)["multiprocessing_context"] is None  # no worker
    assert hardware.loader_kwargs("cpu", 2, start_method=None)["multiprocessing_context"] is None
    # where fork does not exist (Windows), the platform's own method
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    assert hardware.worker_start_method("cuda") is None


def test_training_loader_uses_the_devices_method(synth_data):
    from ptxseg.train import make_loader

    records, _ = load_records(synth_data, "auto")
    cfg = tiny_config(**{"data.workers": 2})
    loader = make_loader(cfg, records, train=True, device="cuda")  # built, not iterated
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert loader.persistent_workers and loader.drop_last
    assert make_loader(cfg, records, train=False, device="cpu").multiprocessing_context \
        .get_start_method() == "fork"  # fmt: skip


def test_the_training_dataset_pickles_and_a_forkserver_loader_iterates(synth_data):
    """What a forkserver (or spawn) worker receives is pickled: the dataset, its albumentations
    pipeline and the worker_init function; the batches equal the dataset's own items."""
    from ptxseg.augment import train_augmenter
    from ptxseg.data.dataset import worker_init

    records, _ = load_records(synth_data, "auto")
    cfg = tiny_config()
    augmented = SegDataset(records, 64, train_augmenter(cfg.augment, 0))
    copy = pickle.loads(pickle.dumps(augmented))
    assert len(copy) == len(augmented) and type(copy.augment) is type(augmented.augment)
    pickle.dumps(worker_init)

    plain = SegDataset(records[:6], 64)  # no augmentation: exact items
    loader = torch.utils.data.DataLoader(
        plain, batch_size=3, worker_init_fn=worker_init,
        **hardware.loader_kwargs("cpu", 2, start_method="forkserver", persistent=True),
    )  # fmt: skip
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    for _epoch in range(2):  # the same two workers serve both epochs
        batches = list(loader)
        images = torch.cat([b[0] for b in batches])
        expected = torch.stack([plain[i][0] for i in range(6)])
        assert torch.equal(images, expected)
    pids = [w.pid for w in loader._iterator._workers]
    assert len(pids) == 2
    list(loader)
    assert [w.pid for w in loader._iterator._workers] == pids  # persistent: not restarted

    aug_loader = torch.utils.data.DataLoader(
        augmented, batch_size=4, worker_init_fn=worker_init,
        **hardware.loader_kwargs("cpu", 1, start_method="forkserver"),
    )  # fmt: skip
    image, mask = next(iter(aug_loader))
    assert image.shape == mask.shape == (4, 1, 64, 64) and image.dtype == torch.uint8
    assert set(np.unique(mask.numpy())) <= {0, 1}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_full_batch_autotuning_skips_validations_short_batch(device, monkeypatch):
    from ptxseg.compilation import AutotuneFullBatches

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", device == "cuda")
    cb = AutotuneFullBatches(batch_size=4)
    seen = []
    for n in (4, 4, 3):  # a validation set of 11 images at batch 4
        cb.on_validation_batch_start(None, None, (torch.zeros(n, 1, 8, 8),) * 2, 0)
        seen.append(torch.backends.cudnn.benchmark)
    cb.on_validation_epoch_end(None, None)
    on = device == "cuda"
    assert seen == [on, on, False]
    assert torch.backends.cudnn.benchmark is on  # restored for training
