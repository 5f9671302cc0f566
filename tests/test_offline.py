"""Offline hygiene (issue 11, item 4): no network at import or run time unless downloadable
weights were asked for; weights that are not cached and cannot be downloaded fail in one line
at once, not after half a minute of hub retries."""

from __future__ import annotations

import json
import socket
import sys
import textwrap

import pytest

from ptxseg import hub
from ptxseg.errors import ConfigError
from ptxseg.model import build_model
from tests.conftest import run_bounded, subprocess_env, tiny_config

#: installed before anything else in a child process: every attempt to resolve a name or to
#: open an internet socket is written to a file (workers included) and refused
BLOCK_NETWORK = textwrap.dedent("""
    import os, socket
    LOG = os.environ["NET_LOG"]
    def _record(what):
        with open(LOG, "a") as fh:
            fh.write(what + "\\n")
        raise OSError("network blocked by the test")
    _connect = socket.socket.connect
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _record(f"connect {address}")
        return _connect(self, address)
    socket.socket.connect = connect
    socket.socket.connect_ex = lambda self, address: connect(self, address)
    socket.create_connection = lambda address, *a, **k: _record(f"create_connection {address}")
    socket.getaddrinfo = lambda host, *a, **k: _record(f"getaddrinfo {host}")
""")


def test_train_and_predict_without_weights_open_no_connection(synth_data, tmp_path):
    run, masks, log = tmp_path / "run", tmp_path / "pred", tmp_path / "net.log"
    sets = {"model.encoder": "efficientnet-b0", "model.encoder_weights": "null",
            "data.size": 64, "data.workers": 1, "train.batch_size": 4, "train.epochs": 1,
            "train.accelerator": "cpu", "train.compile": "false"}  # fmt: skip
    script = BLOCK_NETWORK + textwrap.dedent(f"""
        from ptxseg.cli import main
        sets = [a for k, v in {sets!r}.items() for a in ("--set", f"{{k}}={{v}}")]
        assert main(["train", "--data", {str(synth_data)!r}, "--out", {str(run)!r}, *sets]) == 0
        assert main(["predict", {str(run)!r}, {str(synth_data / "png_images")!r},
                     "--out", {str(masks)!r}, "--device", "cpu", "--workers", "1"]) == 0
        print("done")
    """)
    env = subprocess_env(NET_LOG=str(log))
    for key in ("NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE"):  # ptxseg must not rely on them
        env.pop(key, None)
    proc = run_bounded([sys.executable, "-c", script], 300, "train + predict", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("done")
    assert (masks / "results.csv").is_file()
    assert not log.exists(), log.read_text()
    assert "Error fetching version info" not in proc.stderr


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, online mode, and sockets that record and refuse."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    attempts: list[tuple] = []

    def refuse(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: refuse(a[:2]))
    return tmp_path / "hf", attempts


def test_uncached_imagenet_weights_without_network_fail_at_once(empty_hub):
    cache, attempts = empty_hub
    cfg = tiny_config(**{"model.encoder_weights": "imagenet"})
    with pytest.raises(ConfigError) as err:
        build_model(cfg.model)
    # one probe with a 3 s timeout, no retry (huggingface_hub's own retries took ~33 s)
    assert attempts == [(("huggingface.co", 443), hub.PROBE_TIMEOUT_S)]
    assert str(err.value) == (
        "model.encoder_weights: 'imagenet' weights of efficientnet-b0 (smp-hub/efficientnet-b0."
        f"imagenet in the Hugging Face cache {cache}) are not cached and huggingface.co cannot "
        "be reached (no answer in 3 s); offline, set model.encoder_weights to a local weights "
        "file (README: offline pretrained weights) or null"
    )


def test_offline_mode_fails_without_a_connection_and_hf_endpoint_is_honoured(
    empty_hub, monkeypatch
):
    from huggingface_hub import constants

    _cache, attempts = empty_hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"are not cached and HF_HUB_OFFLINE=1 forbids "
                                          r"downloading them; set model.encoder_weights"):
        build_model(tiny_config(**{"model.encoder_weights": "imagenet"}).model)
    assert attempts == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://hub.mirror.lan:8080")
    with pytest.raises(ConfigError, match="hub.mirror.lan cannot be reached"):
        build_model(tiny_config(**{"model.encoder_weights": "imagenet"}).model)
    assert attempts == [(("hub.mirror.lan", 8080), hub.PROBE_TIMEOUT_S)]


def _cache_files(cache, repo: str, revision: str, files: list[str]) -> None:
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_bytes(b"{}")
    refs = cache / f"models--{repo.replace('/', '--')}" / "refs"
    refs.mkdir()
    (refs / "main").write_text(revision)


def test_cached_weights_need_no_connection(empty_hub):
    from huggingface_hub import constants

    cache, attempts = empty_hub
    source = hub.weights_source("efficientnet-b0", "imagenet")
    assert source.where == "smp-hub/efficientnet-b0.imagenet" and len(source.revision) == 40
    _cache_files(cache, source.where, source.revision, ["config.json"])
    assert not hub.is_cached(source)  # smp needs both files
    (cache / f"models--{source.where.replace('/', '--')}" / "snapshots" / source.revision
     / "model.safetensors").write_bytes(b"{}")  # fmt: skip
    assert hub.is_cached(source)
    with hub.require_weights("efficientnet-b0", "imagenet"):
        assert attempts == []  # a pinned commit in the cache: smp asks nobody
    # timm asks the hub for "main": cached and the hub unreachable -> offline for the build
    timm_source = hub.weights_source("tu-efficientnet_b0", "imagenet")
    _cache_files(cache, timm_source.where, "a" * 40, ["model.safetensors"])
    with hub.require_weights("tu-efficientnet_b0", "imagenet"):
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False
    assert attempts == [(("huggingface.co", 443), hub.PROBE_TIMEOUT_S)]
    assert hub.weights_source("efficientnet-b0", None) is None


def test_albumentations_update_check_is_off_inside_ptxseg(tmp_path):
    """albumentations/__init__.py checks PyPI unless NO_ALBUMENTATIONS_UPDATE is 1/true."""
    log = tmp_path / "net.log"
    script = BLOCK_NETWORK + textwrap.dedent("""
        import os, json
        import ptxseg.augment
        print(json.dumps(os.environ.get("NO_ALBUMENTATIONS_UPDATE")))
    """)
    env = subprocess_env(NET_LOG=str(log))
    env.pop("NO_ALBUMENTATIONS_UPDATE", None)
    proc = run_bounded([sys.executable, "-c", script], 120, "import ptxseg.augment", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == "1"
    assert not log.exists(), log.read_text()
