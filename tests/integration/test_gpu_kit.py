"""The GPU kit's dry mode (``--cpu``): the same steps as on a GPU machine, on the CPU with a tiny
model, so that CI proves the kit runs before a GPU machine is at hand."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "benchmarks" / "gpu"


def test_prepare_dry_run_checks_the_list_and_downloads_nothing():
    out = subprocess.run(["bash", str(KIT / "prepare.sh"), "--cpu"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "zarr==" in out.stdout and "nothing downloaded" in out.stdout


def test_run_dry_mode_measures_every_method_and_restores_bit_exact(tmp_path):
    out = subprocess.run(["bash", str(KIT / "run.sh"), "--cpu", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert {p.name for p in tmp_path.iterdir()} >= {"env.txt", "cuda_tests.log", "bench.log", "gpu_bench.json",
                                                     "gpu_bench.md"}
    d = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert d["env"]["cpu"] is True
    assert {k: v["status"] for k, v in d["sections"].items()} == dict.fromkeys(
        ("env", "bandwidth", "staging", "loop_every10", "restore", "loop_every1"), "ok")
    for loop in ("loop_every10", "loop_every1"):
        for method in ("none", "ckpt", "ckpt_agent", "dcp_async", "dcp_async_pinned", "torch_save"):
            r = d[loop][method]
            assert "error" not in r, (loop, method, r)
            assert r["steps"] > 0 and r["mean_step_s"] > 0
            if method != "none":
                assert r["checkpoints"] >= 1 and r["stall_median_s"] is not None
        assert d[loop]["ckpt"]["failed"] == 0 and d[loop]["ckpt_agent"]["failed"] == 0
    for name in ("shm_file", "anon"):  # the copies into mapped memory (registered on a GPU)
        assert "error" not in d["bandwidth"]["registered"][name], d["bandwidth"]["registered"][name]
    for name in ("ckpt_storage", "ckpt_agent_memory", "dcp_load", "torch_load"):
        assert d["restore"][name]["bit_exact"] is True, (name, d["restore"][name])
    assert d["staging"]["ckpt"]["bytes"] > 0 and d["staging"]["ckpt_agent"]["segments"] >= 1
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "dry run on CPU" in md and "## Targets" in md
