"""patches/apply.py against the installed SGLang: every patch for 0.5.23 applies (or is applied), and an
apply/revert round trip on a copy of the installed files gives working, then original, code."""

from __future__ import annotations

import importlib.util
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang", reason="needs .venv-sglang (scripts/test_sglang.sh)")

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ampd_patches_apply", REPO / "patches" / "apply.py")
apply = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = apply  # dataclasses look their module up there
spec.loader.exec_module(apply)


def test_every_patch_names_engine_version_and_reason():
    patches = apply.all_patches()
    assert patches, "no patches found"
    for patch in patches:
        assert patch.engine in apply.DISTRIBUTIONS and patch.version and len(patch.why) > 40


def test_check_against_installed_sglang():
    out = subprocess.run([sys.executable, str(REPO / "patches" / "apply.py"), "--check", "--engine", "sglang"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ": applied" in out.stdout or ": applicable" in out.stdout, out.stdout


def test_apply_and_revert_round_trip_on_a_copy(tmp_path):
    version, root = apply.installed("sglang")
    for patch in (p for p in apply.all_patches() if p.engine == "sglang" and p.version == version):
        files = [line[6:].strip() for line in patch.path.read_text().splitlines() if line.startswith("+++ b/")]
        for rel in files:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            original = root / rel
            if apply.state(patch)[0] == "applied":  # compare against the pre-patch text
                shutil.copy(original, tmp_path / rel)
                assert apply._patch(tmp_path, patch, "-R")
            else:
                shutil.copy(original, tmp_path / rel)
        before = {rel: (tmp_path / rel).read_text() for rel in files}
        assert apply._patch(tmp_path, patch, "-N")
        for rel in files:
            assert (tmp_path / rel).read_text() != before[rel]
            py_compile.compile(str(tmp_path / rel), doraise=True)
        assert apply._patch(tmp_path, patch, "-R")
        assert {rel: (tmp_path / rel).read_text() for rel in files} == before


def test_multi_tokenizer_detection_matches_patch_state():
    from ampd_plugin.connector.sglang.checks import multi_tokenizer_loads_plugins

    patch = next(p for p in apply.all_patches() if "multi-tokenizer" in p.name)
    assert multi_tokenizer_loads_plugins() == (apply.state(patch)[0] == "applied")
