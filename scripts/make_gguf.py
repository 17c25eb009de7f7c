#!/usr/bin/env python3
"""Converts a Hugging Face Llama folder to GGUF files with llama.cpp's own converter.

Usage: scripts/make_gguf.py MODEL_DIR OUT_DIR [--types f32,q8_0]
Writes OUT_DIR/<folder name>-<type>.gguf for each type and prints their paths.

llama.cpp's convert_hf_to_gguf.py (with its conversion/ package and gguf-py) is taken from the
llama-cpp-python source distribution, which vendors llama.cpp: $LLAMA_CPP_SDIST, else the
newest .llama-cpp/llama_cpp_python-*.tar.gz in this repository (.ci/run downloads it there:
`pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d .llama-cpp`).
The three are extracted once beside the tarball. The converter needs numpy, sentencepiece,
torch and transformers.

Exit status 77 means something needed is missing (the tarball or a Python package): callers
skip their check with the message printed on stderr. Any other failure is a real error.
"""

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SKIP = 77
REPO = Path(__file__).resolve().parent.parent
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def skip(msg):
    print(f"make_gguf: {msg}", file=sys.stderr)
    sys.exit(SKIP)


def find_sdist():
    env = os.environ.get("LLAMA_CPP_SDIST")
    if env:
        if not Path(env).is_file():
            skip(f"LLAMA_CPP_SDIST={env} is not a file")
        return Path(env)
    found = sorted(glob.glob(str(REPO / ".llama-cpp" / "llama_cpp_python-*.tar.gz")))
    if not found:
        skip(
            "no llama-cpp-python source distribution in .llama-cpp/ (get one with: pip download "
            "--no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d .llama-cpp)"
        )
    return Path(found[-1])


def extract(sdist):
    """The vendored llama.cpp folder with the converter, extracted once beside the tarball."""
    name = sdist.name[: -len(".tar.gz")]
    dest = sdist.parent / f"{name}-convert"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    prefix = f"{name}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=sdist.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if rel and rel.startswith(MEMBERS) and (m.isfile() or m.isdir()):
                    m.name = rel
                    members.append(m)
            if not any(m.name == "convert_hf_to_gguf.py" for m in members):
                raise SystemExit(f"make_gguf: {sdist} has no {prefix}convert_hf_to_gguf.py")
            # The "data" filter (Python 3.11.4+) refuses links and paths out of the folder.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **safe)
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / "convert_hf_to_gguf.py").is_file():  # not a concurrent extraction
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--types", default="f32,q8_0", help="comma-separated --outtype values")
    a = ap.parse_args()

    missing = [m for m in ("numpy", "sentencepiece", "torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        skip(f"python3 lacks {', '.join(missing)} (pip install {' '.join(missing)})")
    src = extract(find_sdist())
    a.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    for t in a.types.split(","):
        out = a.out / f"{a.model.name}-{t}.gguf"
        cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(a.model), "--outtype", t, "--outfile", str(out)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stdout + r.stderr)
            raise SystemExit(f"make_gguf: {' '.join(cmd)} failed with status {r.returncode}")
        print(out)


if __name__ == "__main__":
    main()
