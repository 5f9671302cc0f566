"""Bombs in what ptxseg parses whole (issue 26, items 5 and 7): YAML configs and ``--set``
values (alias bombs, deep nesting, millions of keys, duplicate keys, huge values) and the JSON
files it reads (thresholds.json, data.json, cv.json, predict.json): each refused in under
2 s with one line naming the file, exit 2, in bounded memory, and nothing of a file that is
not a config is quoted back.

The CLI cases run ``ptxseg config show`` in a child process limited to 1 GiB of address space
(the alias bomb took 5.5 GB before) and killed after a timeout, so a regression fails the test
instead of hanging or swapping the machine.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import pytest

from ptxseg.config import MAX_BYTES, MAX_DEPTH, MAX_NODES, load_config
from ptxseg.errors import ConfigError, DataError, RunDirError
from ptxseg.fileio import JSON_DEPTH, JSON_LIMIT, read_json
from tests.conftest import run_bounded, subprocess_env

MEMORY = 1 << 30  # address space of the child (ptxseg config show needs about 400 MB)
TIMEOUT = 60  # generous on a loaded 2-core machine; the answer itself takes well under 2 s
FAST = 2.0  # seconds a refusal may take in this process

# nine lists of nine references each: 9**9 = 387 million strings once expanded
ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]"
       for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
) + "\n"
INLINE_BOMB = "{" + ", ".join(ALIAS_BOMB.strip().splitlines()) + "}"
SECRET = "s3cr3t-Pa55"  # what a message must never show of a file that is not a config


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def _config_show(*args: str):
    """``ptxseg config show ARGS`` in a child process of bounded memory and time."""
    return run_bounded([sys.executable, "-m", "ptxseg", "config", "show", *args], TIMEOUT,
                       "ptxseg config show", env=subprocess_env(COLUMNS="400"),
                       preexec_fn=_limit_memory)  # fmt: skip


def _refused_in_time(fn, error=ConfigError):
    start = time.perf_counter()
    with pytest.raises(error) as info:
        fn()
    took = time.perf_counter() - start
    assert took < FAST, f"refused after {took:.1f} s"
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message[:500]
    return message


# ------------------------------------------------------------------------------------- YAML


def _bombs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the one-line refusal says after the file's name)."""
    files = {
        "alias": (ALIAS_BOMB, "YAML anchors and aliases (&name, *name) are not allowed in a "
                              "config (line 1)"),
        "brackets": ("[" * 100_000 + "]" * 100_000,
                     f"nested deeper than {MAX_DEPTH} levels (line 1; not a config)"),
        "braces": ("{a: " * 20_000 + "}" * 20_000,
                   f"nested deeper than {MAX_DEPTH} levels (line 1; not a config)"),
        "keys_1.5M": ("".join(f"k{i}: {i}\n" for i in range(1_500_000)),
                      "too large for a config (23.6 MiB; the limit is 256 KiB)"),
        "keys_20k": ("".join(f"k{i}: {i}\n" for i in range(20_000)),
                     f"more than {MAX_NODES} keys and values (not a config)"),
        "duplicate": ("data:\n  size: 64\ntrain:\n  epochs: 3\n  batch_size: 2\n  epochs: 5\n",
                      "duplicate key 'epochs' (lines 4 and 6)"),
        "duplicate_section": ("train:\n  epochs: 3\nmodel: {}\ntrain: {}\n",
                              "duplicate key 'train' (lines 1 and 4)"),
    }  # fmt: skip
    out = {}
    for name, (text, message) in files.items():
        path = tmp / f"{name}.yaml"
        path.write_text(text)
        out[name] = (path, message)
    return out


def test_yaml_bombs_are_refused_fast_in_one_line(tmp_path):
    for name, (path, message) in _bombs(tmp_path).items():
        got = _refused_in_time(lambda p=path: load_config(p))
        assert got == f"{path}: {message}", name


@pytest.mark.parametrize("name", ["alias", "brackets", "keys_1.5M", "duplicate"])
def test_yaml_bombs_through_the_cli(tmp_path, name):
    path, message = _bombs(tmp_path)[name]
    done = _config_show(str(path))
    assert (done.returncode, done.stdout) == (2, ""), done.stderr[-2000:]
    assert done.stderr == f"error: {path}: {message}\n"


def test_the_same_bombs_inline_in_set(tmp_path):
    cases = {
        f"train.epochs={INLINE_BOMB}":
            "--set train.epochs: YAML anchors and aliases (&name, *name) are not allowed in a "
            "config (line 1)",
        "train.epochs=" + "[" * 100_000:
            f"--set train.epochs: nested deeper than {MAX_DEPTH} levels (line 1; not a config)",
        "train.epochs={a: 1, b: 2, a: 3}":
            "--set train.epochs: duplicate key 'a' (line 1, columns 2 and 14)",
        "train.epochs=" + "x" * (MAX_BYTES + 1):
            f"--set train.epochs: a value longer than {MAX_BYTES} characters",
    }  # fmt: skip
    for item, message in cases.items():
        assert _refused_in_time(lambda i=item: load_config("demo", [i])) == message
    done = _config_show("demo", "--set", f"train.epochs={INLINE_BOMB}")
    assert (done.returncode, done.stderr) == (2, f"error: {next(iter(cases.values()))}\n")


def test_a_long_value_is_cut_in_the_message(tmp_path):
    """A value of a known key that is wrong is quoted, cut to 60 characters (a 6-level alias
    bomb made a 34.7 MB line before); a --set item too long to show is cut to 200."""
    path = tmp_path / "long.yaml"
    path.write_text("train:\n  epochs: " + "x" * 100_000 + "\n")
    got = _refused_in_time(lambda: load_config(path))
    assert got.startswith(f"{path}: 'train.epochs': Input should be a valid integer")
    assert got.endswith(" (got '" + "x" * 56 + "...)")
    got = _refused_in_time(lambda: load_config("demo", ["y" * 5000]))
    assert got == "--set " + "y" * 197 + "...: expected key=value, e.g. train.epochs=3"


def test_nothing_of_a_file_that_is_not_a_config_is_quoted(tmp_path):
    """/etc/shadow's first line was the message ("unknown key 'root:$6$...'"); a file that
    is not valid YAML, or valid YAML but no ptxseg config, is refused without a word of it."""
    shadow = tmp_path / "shadow"
    shadow.write_text(f"root:$6${SECRET}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f'train:\n  epochs: "{SECRET}\n')
    tagged = tmp_path / "tag.yaml"
    tagged.write_text(f"train: !{SECRET} x\n")
    weird_key = tmp_path / "key.yaml"
    weird_key.write_text(f"train: {{}}\n'{SECRET} x': 1\n")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(SECRET.encode() + b"\xff\xfe\x00")
    control = tmp_path / "ctl.yaml"
    control.write_text(f"train: {SECRET}\x07\n")
    expected = {
        shadow: "not a ptxseg config (none of its 2 top-level keys is a section: data, model, "
                "loss, optim, train, augment)",
        bad_yaml: "not valid YAML (line 3, column 1: found unexpected end of stream)",
        tagged: "not valid YAML (line 1, column 8: could not determine a constructor for the "
                "tag)",
        weird_key: "an unknown key that is not a config key name (not shown)",
        binary: "not a config (not UTF-8 text: byte 11)",
        control: "not valid YAML (not text: a control character at byte 18)",
    }  # fmt: skip
    for path, message in expected.items():
        got = _refused_in_time(lambda p=path: load_config(p))
        assert got == f"{path}: {message}"
    done = _config_show(str(shadow))
    assert (done.returncode, done.stderr) == (2, f"error: {shadow}: {expected[shadow]}\n")


def test_a_config_with_a_misspelt_section_still_gets_its_suggestion(tmp_path):
    """The not-a-config rule leaves configs alone: a misspelt only section keeps its
    suggestion, an empty mapping is the defaults."""
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    assert _refused_in_time(lambda: load_config(path)) == (
        f"{path}: unknown key 'trian' (did you mean train?)"
    )
    path.write_text("{}\n")
    assert load_config(path) == load_config()


# ------------------------------------------------------------------------------------- JSON


def _deep_json(path: Path, levels: int = 100_000) -> Path:
    path.write_text('{"a": ' * levels + "1" + "}" * levels)
    return path


def test_json_nesting_and_size_are_bounded(tmp_path):
    deep = _deep_json(tmp_path / "deep.json")
    assert _refused_in_time(lambda: read_json(deep, "x"), DataError) == (
        f"{deep}: nested deeper than {JSON_DEPTH} levels (not a x)"
    )
    # deep enough to pass the json module's recursion limit, deeper than JSON_DEPTH
    less = _deep_json(tmp_path / "less.json", JSON_DEPTH + 1)
    assert _refused_in_time(lambda: read_json(less, "x"), DataError) == (
        f"{less}: nested deeper than {JSON_DEPTH} levels (not a x)"
    )
    assert read_json(_deep_json(tmp_path / "ok.json", JSON_DEPTH), "x") is not None
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:  # sparse: refused from its size, never read
        fh.truncate(JSON_LIMIT + 1)
    assert _refused_in_time(lambda: read_json(huge, "x"), DataError) == (
        f"{huge}: too large for a x (64 MiB; the limit is 64 MiB)"
    )


def test_every_json_file_ptxseg_reads_is_bounded(tmp_path):
    """thresholds.json, RUN/data.json, CV/cv.json, OUT/predict.json and the run's config.yaml,
    each a bomb: a one-line refusal (predict.json: ignored as unreadable), never a
    RecursionError."""
    from ptxseg.cv import read_manifest
    from ptxseg.outputs import previous_outputs
    from ptxseg.postprocess import load_params
    from ptxseg.run import Run

    run = tmp_path / "run"
    run.mkdir()
    thresholds = _deep_json(run / "thresholds.json")
    _deep_json(run / "data.json")
    _deep_json(run / "cv.json")
    _deep_json(run / "predict.json")
    (run / "config.yaml").write_text(ALIAS_BOMB)
    deep = f"nested deeper than {JSON_DEPTH} levels"
    assert _refused_in_time(lambda: load_params(thresholds), DataError) == (
        f"{thresholds}: {deep} (not a thresholds file)"
    )
    assert _refused_in_time(lambda: Run(run).dataset(), RunDirError) == (
        f"{run / 'data.json'}: {deep} (not a dataset record)"
    )
    assert Run(run).read_info() == {}  # rewritten by the next extension
    assert _refused_in_time(lambda: read_manifest(run), RunDirError) == (
        f"{run / 'cv.json'}: {deep} (not a cross-validation manifest)"
    )
    assert previous_outputs(run) is None
    assert _refused_in_time(lambda: Run(run).config()).startswith(
        f"{run / 'config.yaml'}: YAML anchors and aliases"
    )


def test_a_thresholds_bomb_through_the_cli(tmp_path):
    from tests.conftest import make_run
    from tests.test_predict import run_cli

    run = tmp_path / "run"
    make_run(run)
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    bomb = _deep_json(tmp_path / "t.json")
    rc, out, err = run_cli(["predict", str(run), str(image), "--out", str(tmp_path / "o"),
                            "--thresholds", str(bomb)])  # fmt: skip
    assert (rc, err) == (2, f"error: {bomb}: nested deeper than {JSON_DEPTH} levels (not a "
                            "thresholds file)\n")  # fmt: skip
