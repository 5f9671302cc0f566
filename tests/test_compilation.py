"""Compile that pays and says so (issue 11, items 1-2): the ``train.compile`` policy, the
regional blocks and dynamo's recompile limit, the compile cache folder, the status lines and
eager validation. Real inductor compiles cost minutes on a CPU: the dynamo tests here trace
with the ``eager`` backend (the same guards and cache entries, no code generation);
``benchmarks/compile_time.py`` compiles for real."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from ptxseg import compilation
from ptxseg.compilation import (
    REFERENCE_SAVING_S,
    CacheLocation,
    Ledger,
    cache_location,
    decide,
    planned_steps,
    repeated_blocks,
)
from ptxseg.errors import ConfigError
from ptxseg.model import build_model
from tests.conftest import tiny_config

# ------------------------------------------------------------------------------------------
# the policy


def test_the_reference_saving_is_the_measured_one():
    # the H200 figures: 250 images/s eager, 348 compiled at batch 32, 512 px
    assert 32 / 250 - 32 / 348 == pytest.approx(REFERENCE_SAVING_S, abs=0.001)


def test_auto_compiles_on_cuda_only_where_the_planned_steps_repay_it_twice():
    paper_on_siim = 10240 // 32 * 300  # 96,000 steps
    d = decide("auto", "cuda", planned_steps=paper_on_siim, batch_size=32, size=512)
    assert d.mode == "regional" and d.on
    assert str(d) == ("compile: regional (auto: 96,000 planned steps x ~36 ms saved = "
                      "~57 min 36 s >= 2 x ~60 s to compile, empty cache)")  # fmt: skip
    # the break-even point, by hand: steps x 36 ms >= 2 x 60 s -> 120 / 0.036 = 3333.3
    need = 3334
    assert decide("auto", "cuda", planned_steps=need, batch_size=32, size=512).on
    off = decide("auto", "cuda", planned_steps=need - 1, batch_size=32, size=512)
    assert not off.on and off.reason.endswith("to compile, empty cache: would not pay")
    # the real SIIM sample: 92 training images at batch 32, 300 epochs = 600 steps
    sample = decide("auto", "cuda", planned_steps=planned_steps(92, 32, 300), batch_size=32,
                    size=512)  # fmt: skip
    assert sample.mode == "off"
    assert sample.reason.startswith("auto: 600 planned steps x ~36 ms saved = ~22 s < 2 x ~60 s")
    # a setup the cache holds costs less: the break-even point moves down
    warm_need = 1112  # by hand: 2 x 20 s / 0.036 s = 1111.1
    warm = decide("auto", "cuda", planned_steps=warm_need, batch_size=32, size=512,
                  compiled_before=7.8)  # fmt: skip
    assert warm.on and warm.reason.endswith("warm cache")
    assert not decide("auto", "cuda", planned_steps=warm_need - 1, batch_size=32, size=512,
                      compiled_before=7.8).on  # fmt: skip
    # the demo on a GPU: 128 px, batch 16, 256 images x 8 epochs: the saving scales by pixels
    demo = decide("auto", "cuda", planned_steps=planned_steps(256, 16, 8), batch_size=16,
                  size=128)  # fmt: skip
    assert planned_steps(256, 16, 8) == 128 and not demo.on
    assert "~1 ms saved" in demo.reason  # 36 ms x (16 x 128²) / (32 x 512²) = 1.1 ms


def test_auto_is_off_off_cuda_and_explicit_settings_win():
    for device in ("cpu", "mps"):
        d = decide("auto", device, planned_steps=10**9)
        assert d.mode == "off" and d.reason == f"auto: only on CUDA, this is {device}"
    assert decide("auto", "cuda").mode == "regional"  # steps unknown (a benchmark's module)
    assert decide(True, "cpu").mode == "regional"  # older configs: true = regional
    assert decide("regional", "cpu", planned_steps=1).mode == "regional"
    assert decide("whole", "cuda", planned_steps=1).mode == "whole"
    for off in (False, "false"):
        assert decide(off, "cuda", planned_steps=10**9).mode == "off"
    with pytest.raises(ConfigError, match=r"train.compile: unknown 'fast' \(valid: auto, false, "
                                          r"regional, whole\)"):  # fmt: skip
        decide("fast", "cuda")


def test_planned_steps_follow_the_loader():
    assert planned_steps(92, 32, 300) == 2 * 300  # incomplete last batch dropped
    assert planned_steps(20, 32, 5) == 5  # fewer images than a batch: one step per epoch
    assert planned_steps(10240, 32, 1, processes=2) == 160  # DDP: each process half


def test_the_config_takes_the_compile_modes():
    assert tiny_config(**{"train.compile": "regional"}).train.compile == "regional"
    assert tiny_config(**{"train.compile": "whole"}).train.compile == "whole"
    assert tiny_config(**{"train.compile": True}).train.compile is True
    with pytest.raises(ConfigError):
        tiny_config(**{"train.compile": "fast"})


# ------------------------------------------------------------------------------------------
# the cache folder


def test_cache_folder_default_config_key_and_the_users_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_location(None, {}) == CacheLocation(
        tmp_path / "home" / ".cache" / "ptxseg" / "inductor", "default"
    )
    xdg = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert cache_location(None, xdg).path == tmp_path / "xdg" / "ptxseg" / "inductor"
    assert cache_location(str(tmp_path / "mine"), xdg) == CacheLocation(
        tmp_path / "mine", "train.compile_cache"
    )
    user = {**xdg, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "users")}
    where = cache_location(str(tmp_path / "mine"), user)
    assert where == CacheLocation(tmp_path / "users", "TORCHINDUCTOR_CACHE_DIR")
    assert str(where) == f"{tmp_path / 'users'} (from TORCHINDUCTOR_CACHE_DIR)"
    # importing Lightning writes torch's own default there: not a choice of the user's
    torch_default = {**xdg, "TORCHINDUCTOR_CACHE_DIR": compilation.torch_default_cache_dir()}
    assert cache_location(None, torch_default).source == "default"


def test_use_cache_points_the_inductor_there(tmp_path, monkeypatch):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(compilation, "_set_by_us", None)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    where = cache_location(str(tmp_path / "cache"))
    compilation.use_cache(where)
    assert cache_dir() == str(tmp_path / "cache")  # what the inductor itself will use
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    # the value ptxseg set is not mistaken for the user's on the next run in this process
    assert cache_location(str(tmp_path / "other")).path == tmp_path / "other"


def test_the_ledger_says_whether_a_setup_was_compiled_before(tmp_path):
    ledger = Ledger(tmp_path)
    assert ledger.first_step("k") is None
    ledger.record("k", 212.34, warm=False)
    assert ledger.first_step("k") == 212.3
    ledger.record("k", 7.84, warm=True)
    assert ledger.first_step("k") == 7.8
    data = (tmp_path / compilation.LEDGER).read_text()
    assert '"cold_first_step_s": 212.3' in data
    (tmp_path / compilation.LEDGER).write_text("{not json")
    assert Ledger(tmp_path).first_step("k") is None  # a damaged ledger: an empty cache


# ------------------------------------------------------------------------------------------
# what regional compilation compiles


@pytest.mark.parametrize(
    "encoder, expected",
    [
        ("efficientnet-b0", {"MBConvBlock": 16, "UnetDecoderBlock": 5}),
        ("resnet18", {"BasicBlock": 8, "UnetDecoderBlock": 5}),
        ("tu-efficientnet_b0", {"InvertedResidual": 15, "UnetDecoderBlock": 5}),
    ],
)
def test_regional_compilation_finds_the_repeated_blocks(encoder, expected):
    model = build_model(tiny_config(**{"model.encoder": encoder}).model, pretrained=False)
    blocks = repeated_blocks(model)
    kinds: dict[str, int] = {}
    for _name, block in blocks:
        kinds[type(block).__name__] = kinds.get(type(block).__name__, 0) + 1
    assert kinds == expected
    names = [n for n, _ in blocks]
    assert names[-5:] == [f"net.decoder.blocks.{i}" for i in range(5)]
    # outermost blocks only; the stem, the normalisation and the head stay eager
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)
    eager = [n for n, _ in model.named_modules() if not any(
        n == b or n.startswith(b + ".") for b in names)]  # fmt: skip
    assert "net.segmentation_head" in eager and "" in eager
    assert any("conv_stem" in n or n.endswith("conv1") for n in eager)
    assert compilation.recompile_limit_needed(blocks) == max(expected.values())


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo
    import torch._dynamo.config as dynamo_config

    names = ("recompile_limit", "accumulated_recompile_limit")
    saved = {name: getattr(dynamo_config, name) for name in names}
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    for name, value in saved.items():
        setattr(dynamo_config, name, value)


def _entries(model) -> dict[str, int]:
    import torch._dynamo.eval_frame as ef

    return {type(b).__name__: len(ef._debug_get_cache_entry_list(type(b).forward.__code__))
            for _n, b in repeated_blocks(model)}  # fmt: skip


def test_every_block_stays_compiled_and_validation_adds_no_graph(fresh_dynamo):
    """EfficientNet's MBConv blocks share one code object and each needs its own compiled
    version (shapes, strides, expansion, stochastic-depth rate): 16 in B0, above dynamo's
    default limit of 8, past which blocks would silently run eagerly."""
    import torch._dynamo.config as dynamo_config

    model = build_model(tiny_config().model, pretrained=False).train()
    compiled = compilation.compile_model(model, "regional", backend="eager")
    assert compiled.classes == {"MBConvBlock": 16, "UnetDecoderBlock": 5}
    assert dynamo_config.recompile_limit >= 16
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    model(x).float().mean().backward()
    assert _entries(model) == {"MBConvBlock": 16, "UnetDecoderBlock": 5}
    model.eval()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # as in validation
        model(x)
    model.train()
    model(x).float().mean().backward()  # the training graphs again: no recompile
    assert _entries(model) == {"MBConvBlock": 16, "UnetDecoderBlock": 5}
    assert compilation.is_compiled(model)


# ------------------------------------------------------------------------------------------
# the status lines, through the command line, in a log (plain lines)


def test_compile_status_lines_and_eager_validation(synth_data, tmp_path, capsys, monkeypatch,
                                                   fresh_dynamo):  # fmt: skip
    from ptxseg.cli import main

    # trace with dynamo's eager backend: the same blocks, guards and callbacks, no codegen
    monkeypatch.setattr(compilation, "compile_model",
                        functools.partial(compilation.compile_model, backend="eager"))
    cache = tmp_path / "cache"
    args = ["train", "--data", str(synth_data), "--set", "model.encoder=efficientnet-b0",
            "--set", "model.encoder_weights=null", "--set", "data.size=64",
            "--set", "data.workers=0", "--set", "train.batch_size=4",
            "--set", "train.accelerator=cpu", "--set", "train.epochs=2",
            "--set", "train.compile=regional", "--set", f"train.compile_cache={cache}"]
    assert main([*args, "--out", str(tmp_path / "run1")]) == 0
    err = capsys.readouterr().err.splitlines()
    announcement = next(line for line in err if line.startswith("training on "))
    assert ", compile: regional (train.compile=regional);" in announcement
    status = [line for line in err if line.startswith("compiling ")]
    assert status == [
        "compiling 21 repeated blocks (16 MBConvBlock, 5 UnetDecoderBlock; stem and head "
        "eager) for the training step (validation eager): first time about 60 s on a GPU, "
        "longer on a CPU; about 20 s once cached; "
        f"cache {cache} (from train.compile_cache)"
    ]
    first = [line for line in err if line.startswith("first step after ")]
    assert len(first) == 1
    m = re.fullmatch(r"first step after (\d+\.\d) s \(compile, cold cache\)", first[0])
    assert m, first
    assert err.index(status[0]) < err.index(first[0]) < next(
        i for i, line in enumerate(err) if line.startswith("epoch 1/2"))  # fmt: skip
    # two epochs with validation after each: still one compiled version per block
    assert _entries_after_run() == {"MBConvBlock": 16, "UnetDecoderBlock": 5}
    assert torch._dynamo.eval_frame._stance.stance == "default"
    key = next(iter(Ledger(cache)._read()))
    assert key.startswith(f"torch {torch.__version__}|cpu|regional|unet/efficientnet-b0|64px")
    assert Ledger(cache).first_step(key) == float(m[1])

    # the same setup again: the status line says the cache holds it
    assert main([*args, "--out", str(tmp_path / "run2")]) == 0
    err = capsys.readouterr().err
    assert (f"this setup is in the cache (its first step took {float(m[1]):.1f} s); cache "
            f"{cache} (from train.compile_cache)") in err  # fmt: skip


def _entries_after_run() -> dict[str, int]:
    model = build_model(tiny_config().model, pretrained=False)  # same classes, same code
    return _entries(model)


def test_prepare_on_the_cpu_leaves_compile_off_and_says_nothing(synth_data, tmp_path):
    from ptxseg.train import prepare

    training = prepare(tiny_config(**{"train.compile": "auto"}), synth_data, tmp_path / "r",
                       progress=False)  # fmt: skip
    assert training.module.compiled is None
    assert training.module.compile_plan.decision.reason == "auto: only on CUDA, this is cpu"
    assert "compile" not in training.announcement
    assert not compilation.is_compiled(training.module)
    assert not any(isinstance(c, compilation.CompileStatus) for c in training.trainer.callbacks)


def test_cache_counts_name_the_warmth():
    assert compilation.warmth(42, 0) == "warm cache"
    assert compilation.warmth(0, 42) == "cold cache"
    assert compilation.warmth(0, 0) == "cold cache"
    assert compilation.warmth(40, 2) == "partly warm cache (40 of 42 graphs cached)"
    assert compilation.first_step_line(7.84, 42, 0) == (
        "first step after 7.8 s (compile, warm cache)")
    assert Path(compilation.default_cache_dir({"XDG_CACHE_HOME": "/x"})) == Path(
        "/x/ptxseg/inductor")


def test_a_compile_that_stays_off_looks_at_no_cache(tmp_path, monkeypatch):
    """``false`` anywhere and ``auto`` off CUDA: no cache folder, ledger or device query; a
    compile that may run still reads the ledger."""

    def no_cache(*args, **kwargs):
        raise AssertionError("the compile cache was looked at")

    monkeypatch.setattr(compilation, "cache_location", no_cache)
    for setting, device in (("false", "cuda"), ("auto", "cpu"), ("regional", "cpu")):
        cfg = tiny_config(**{"train.compile": setting})
        if setting == "regional":  # on: the cache is needed
            with pytest.raises(AssertionError, match="cache was looked at"):
                compilation.plan(cfg, device, steps=10)
            continue
        planned = compilation.plan(cfg, device, steps=10)
        assert not planned.decision.on and planned.location is None
