"""Compile time and compiled speed of the training step: eager, whole-model and regional
compilation (``ptxseg.compilation``), each in a fresh process.

For each variant: a **cold** run (a new, empty compile cache folder) and, for the compiled
ones, a **warm** run (a new process, the same folder again). Each run builds the module the
way training does (``ptxseg.lightning_module.build_module`` with ``train.compile`` and
``train.compile_cache`` set), then times on random uint8 batches already on the device:

- ``first_step_s``: the first optimizer step (forward, loss, backward, Adam) = the compile;
- ``process_to_first_step_s``: from the process's start (imports included) to that step;
- ``steady_ms``: median step time over ``--steps`` steps after ``--warmup`` more;
- ``cache_hits`` / ``cache_misses``: compiled graphs loaded from / written to the cache;
- ``compiled_entries``: compiled versions held per block code object (regional: one per
  block; fewer would mean dynamo's recompile limit sent blocks back to eager);
- with ``--eval``: an eval-mode forward eager (``force_eager``, what validation does) against
  compiling it (first call, then steady): what a second set of graphs would cost.

One JSON line per run, then ``summary`` lines with the ratios regional/whole (cold and warm
first step; steady speed regional/whole, 1.0 = as fast as whole; warm/cold first step). Each
run has ``--timeout`` seconds (then its process group is killed: a ``timeout`` line). The
machine's load average is recorded at the start and after each run (``os.getloadavg``).

Usage::

    python benchmarks/compile_time.py                       # CPU: B4 U-Net, 64 px, batch 2
    python benchmarks/compile_time.py --device cuda --size 512 --batch 32 --steps 30
    python benchmarks/compile_time.py --variants regional --runs cold,warm --eval
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import run_killable  # noqa: E402

VARIANTS = ("eager", "whole", "regional")
SETTING = {"eager": "false", "whole": "whole", "regional": "regional"}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ------------------------------------------------------------------------------------------
# one run (a child process)


def child(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from ptxseg import compilation
    from ptxseg.config import load_config
    from ptxseg.lightning_module import build_module
    from ptxseg.trainer import hardware_kwargs

    cfg = load_config("paper", [
        f"model.encoder={args.encoder}", "model.encoder_weights=null",
        f"data.size={args.size}", f"train.batch_size={args.batch}",
        f"train.accelerator={args.device}", f"train.compile={SETTING[args.variant]}",
        f"train.compile_cache={args.cache}", *args.sets,
    ])  # fmt: skip
    hw = hardware_kwargs(cfg)
    device = torch.device("cuda" if hw["accelerator"] == "cuda" else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    module = build_module(cfg, pretrained=False).to(device).train()
    opt = torch.optim.Adam(module.model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(hw["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=hw["precision"] == "16-mixed")
    b, s = args.batch, args.size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (b, 1, s, s), dtype=torch.uint8, generator=g).to(device)
    y = (torch.rand((b, 1, s, s), generator=g) < 0.05).to(torch.uint8).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = module.loss_fn(module(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sync()
        return time.perf_counter() - t0

    built = time.perf_counter()
    first = step()
    to_first = time.perf_counter() - T_START
    hits, misses = compilation.cache_counts()
    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    out = {
        "variant": args.variant, "run": args.run, "encoder": args.encoder, "size": s,
        "batch": b, "device": device.type, "precision": hw["precision"],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "import_and_build_s": round(built - T_START, 2), "first_step_s": round(first, 2),
        "process_to_first_step_s": round(to_first, 2),
        "steady_ms": round(1000 * statistics.median(times), 2),
        "images_per_s": round(b / statistics.median(times), 2),
        "cache_hits": hits, "cache_misses": misses, "cache": str(args.cache),
    }  # fmt: skip
    if module.compiled is not None:
        out["compiled"] = module.compiled.describe()
        out["compiled_entries"] = entries(module.model)
    if args.eval and module.compiled is not None:
        out.update(eval_costs(module, x, dtype, device, sync))
    return out


def entries(model) -> dict[str, int]:
    """Compiled versions dynamo holds per block class (its code object)."""
    import torch._dynamo.eval_frame as ef

    from ptxseg.compilation import repeated_blocks

    found: dict[str, int] = {}
    for _name, block in repeated_blocks(model):
        code = type(block).forward.__code__
        found[type(block).__name__] = len(ef._debug_get_cache_entry_list(code))
    return found


def eval_costs(module, x, dtype, device, sync) -> dict:
    """An eval forward eager (validation's way) vs compiling it: first call, then steady."""
    import torch

    module.eval()

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            module(x)
        sync()
        return time.perf_counter() - t0

    with torch.compiler.set_stance("force_eager"):
        eager = statistics.median([forward() for _ in range(3)])
    first = forward()  # compiles the eval-mode graphs
    compiled = statistics.median([forward() for _ in range(3)])
    return {"eval_eager_ms": round(1000 * eager, 2), "eval_compile_first_s": round(first, 2),
            "eval_compiled_ms": round(1000 * compiled, 2)}  # fmt: skip


# ------------------------------------------------------------------------------------------
# the parent: fresh processes, cold and warm


def run_child(args, variant: str, run: str, cache: Path) -> dict | None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH"))
                                        if p)  # fmt: skip
    cmd = [sys.executable, __file__, "--child", variant, "--run", run, "--cache", str(cache),
           "--encoder", args.encoder, "--size", str(args.size), "--batch", str(args.batch),
           "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
           *(["--eval"] if args.eval else []),
           *[a for kv in args.sets for a in ("--set", kv)]]  # fmt: skip
    t0 = time.perf_counter()
    # its own process group: past --timeout the child and the inductor's compile workers die
    done = run_killable(cmd, env, args.timeout)
    if done is None:
        emit({"figure": "timeout", "variant": variant, "run": run,
              "after_s": round(time.perf_counter() - t0, 1), "load_avg": load()})  # fmt: skip
        return None
    code, out, err = done
    if code != 0:
        emit({"figure": "error", "variant": variant, "run": run,
              "stderr": err.strip().splitlines()[-5:]})  # fmt: skip
        return None
    record = json.loads(out.strip().splitlines()[-1])
    record["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="efficientnet-b4")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--runs", default="cold,warm",
                    help="cold, warm, or both in that order (cold,warm; the default)")
    ap.add_argument("--steps", type=int, default=5, help="timed steady steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps after the first, untimed")
    ap.add_argument("--eval", action="store_true", help="also time eval eager vs compiled")
    ap.add_argument("--cache-root", type=Path, default=None, help="where the caches go")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--run", default="cold", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.variant = args.child
        emit(child(args))
        return 0

    root = args.cache_root or Path(tempfile.mkdtemp(prefix="ptxseg-compile-"))
    runs = ["cold", "warm"] if args.runs == "both" else args.runs.split(",")
    bad = sorted(set(runs) - {"cold", "warm"})
    if bad:
        raise SystemExit(f"--runs: unknown {', '.join(bad)} (valid: cold, warm, both)")
    emit({"figure": "start", "load_avg": load(), "cpu_cores": os.cpu_count(),
          "cache_root": str(root)})  # fmt: skip
    got: dict[tuple[str, str], dict] = {}
    for variant in args.variants.split(","):
        cache = root / variant
        for run in runs:
            if variant == "eager" and run == "warm":
                continue
            if run == "cold" and cache.exists():
                raise SystemExit(f"{cache}: not empty (cold runs need a new --cache-root)")
            record = run_child(args, variant, run, cache)
            if record is not None:
                got[(variant, run)] = record
                emit({"figure": "run", "load_avg": load(), **record})
    for run in runs:
        whole, regional = got.get(("whole", run)), got.get(("regional", run))
        if whole and regional:
            emit({"figure": "summary", "run": run,
                  "regional_over_whole_first_step": round(
                      regional["first_step_s"] / whole["first_step_s"], 3),
                  "regional_over_whole_process_to_first_step": round(
                      regional["process_to_first_step_s"]
                      / whole["process_to_first_step_s"], 3),
                  "steady_speed_regional_over_whole": round(
                      whole["steady_ms"] / regional["steady_ms"], 3),
                  "load_avg": load()})  # fmt: skip
    for variant in ("whole", "regional"):
        cold, warm = got.get((variant, "cold")), got.get((variant, "warm"))
        if cold and warm:
            emit({"figure": "summary", "variant": variant,
                  "warm_over_cold_first_step": round(
                      warm["first_step_s"] / cold["first_step_s"], 3),
                  "warm_over_cold_process_to_first_step": round(
                      warm["process_to_first_step_s"] / cold["process_to_first_step_s"], 3)})
    eager = got.get(("eager", "cold"))
    for variant in ("whole", "regional"):
        if eager and (variant, "cold") in got:
            emit({"figure": "summary", "variant": variant,
                  "speedup_over_eager": round(eager["steady_ms"]
                                              / got[(variant, "cold")]["steady_ms"], 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
