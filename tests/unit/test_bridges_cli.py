"""``ckpt import dcp|hf`` and ``ckpt export --format dcp|hf`` on bad input: a clear one-line error,
the documented exit code, and nothing left behind; a planted malicious DCP ``.metadata`` is
refused without running it; ``--version``."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import ckpt
from ckpt.cli import EXIT_CORRUPT, EXIT_USAGE, main
from ckpt.errors import UnsafeCheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("ckpt: ")]
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _state():
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(10, 6, generator=g), "b": torch.randn(6, generator=g).to(torch.bfloat16)},
            "step": 4, "sched": {"last_epoch": 4}}


@pytest.fixture
def dcp_folder(tmp_path):
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "dcp"
    dcp.save(_state(), checkpoint_id=str(path))
    return path


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"ckpt {ckpt.__version__}"


def test_agent_version(capsys):
    from agent.cli import main as agent_main

    with pytest.raises(SystemExit) as e:
        agent_main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ckpt-agent {ckpt.__version__}"


def test_import_dcp_round_trip_and_existing_step(capsys, tmp_path, dcp_folder):
    code, out, err = run(capsys, "import", "dcp", dcp_folder, tmp_path / "run", "--step", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["tensors"] == 2
    got = ckpt.read(str(tmp_path / "run"))
    want = _state()
    assert torch.equal(got["model"]["w"], want["model"]["w"]) and torch.equal(got["model"]["b"], want["model"]["b"])
    assert got["step"] == 4 and got["sched"] == {"last_epoch": 4}
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    code, _, err = run(capsys, "import", "dcp", dcp_folder, tmp_path / "run", "--step", "3")
    assert code == EXIT_USAGE and "--overwrite" in one_error_line(err)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    code, _, err = run(capsys, "import", "dcp", dcp_folder, tmp_path / "run", "--step", "3", "--overwrite",
                       "--layout", "packs")
    assert code == 0, err
    assert ckpt.read_manifest(ckpt.open_storage(str(tmp_path / "run")), 3).layout == "packs"


def test_import_of_a_folder_that_is_not_dcp(capsys, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("x")
    code, _, err = run(capsys, "import", "dcp", tmp_path / "src", tmp_path / "run", "--step", "1")
    assert code == EXIT_USAGE and "not a DCP checkpoint" in one_error_line(err)
    assert not (tmp_path / "run").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_planted_malicious_metadata_is_refused(capsys, tmp_path, dcp_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    md = ckpt.dcp.load_metadata((dcp_folder / ".metadata").read_bytes())
    md.planner_data = {"x": _Evil()}
    (dcp_folder / ".metadata").write_bytes(pickle.dumps(md))
    code, _, err = run(capsys, "import", "dcp", dcp_folder, tmp_path / "run", "--step", "1")
    line = one_error_line(err)
    assert code == EXIT_CORRUPT and "posix.system" in line and "refusing" in line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()
    with pytest.raises(UnsafeCheckpointError):
        ckpt.dcp.load_metadata(pickle.dumps({"a": print}))  # any global outside the allow-list


def test_metadata_without_file_locations_is_refused(capsys, tmp_path, dcp_folder):
    md = ckpt.dcp.load_metadata((dcp_folder / ".metadata").read_bytes())
    md.storage_data = None  # what a writer other than FileSystemWriter may leave
    (dcp_folder / ".metadata").write_bytes(pickle.dumps(md))
    code, _, err = run(capsys, "import", "dcp", dcp_folder, tmp_path / "run", "--step", "1")
    assert code == EXIT_CORRUPT and "no file locations" in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_truncated_dcp_data_leaves_nothing(capsys, tmp_path, dcp_folder):
    data = dcp_folder / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:100])
    code, _, err = run(capsys, "import", "dcp", dcp_folder, tmp_path / "run", "--step", "1")
    assert code == EXIT_CORRUPT and "truncated" in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_export_dcp_read_by_stock_dcp_load(capsys, tmp_path):
    import torch.distributed.checkpoint as dcp

    ckpt.save(_state(), str(tmp_path / "run"), step=2)
    code, _, err = run(capsys, "export", tmp_path / "run", "--format", "dcp", tmp_path / "out", "--buffer-bytes", "64")
    assert code == 0, err
    into = {"model": {"w": torch.zeros(10, 6), "b": torch.zeros(6, dtype=torch.bfloat16)}, "step": 0,
            "sched": {"last_epoch": 0}}
    dcp.load(into, checkpoint_id=str(tmp_path / "out"))
    want = _state()
    assert torch.equal(into["model"]["w"], want["model"]["w"]) and into["sched"] == {"last_epoch": 4}
    code, _, err = run(capsys, "export", tmp_path / "run", "--format", "dcp", tmp_path / "out")
    assert code == EXIT_USAGE and "--overwrite" in one_error_line(err)


# ---------------------------------------------------------------------------------------------
# Hugging Face folders


def _write_safetensors(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def test_import_hf_bad_folders(capsys, tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    code, _, err = run(capsys, "import", "hf", src, tmp_path / "run", "--step", "1")
    assert code == EXIT_USAGE and "not a Hugging Face checkpoint" in one_error_line(err)
    _write_safetensors(src / "model-00001-of-00002.safetensors", {"a": torch.ones(3)})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    code, _, err = run(capsys, "import", "hf", src, tmp_path / "run", "--step", "1")
    assert code == EXIT_CORRUPT and "model-00002-of-00002.safetensors" in one_error_line(err)
    _write_safetensors(src / "model-00002-of-00002.safetensors", {"b": torch.ones(1000)})
    whole = (src / "model-00002-of-00002.safetensors").read_bytes()
    (src / "model-00002-of-00002.safetensors").write_bytes(whole[:-10])
    code, _, err = run(capsys, "import", "hf", src, tmp_path / "run", "--step", "1")
    assert code == EXIT_CORRUPT and "truncated" in one_error_line(err)
    assert not (tmp_path / "run").exists()
    (src / "model-00002-of-00002.safetensors").write_bytes(whole)
    code, _, err = run(capsys, "import", "hf", src, tmp_path / "run", "--step", "1", "--prefix", "net/")
    assert code == 0, err
    got = ckpt.read(str(tmp_path / "run"))
    assert torch.equal(got["net"]["a"], torch.ones(3)) and torch.equal(got["net"]["b"], torch.ones(1000))


def test_export_hf_refuses_to_overwrite_weights(capsys, tmp_path):
    ckpt.save(_state(), str(tmp_path / "run"), step=2)
    out = tmp_path / "hf"
    code, out_text, err = run(capsys, "export", tmp_path / "run", "--format", "hf", out, "--json")
    assert code == 0, err
    assert json.loads(out_text)["files"] == ["model.safetensors"]
    from safetensors.torch import load_file

    loaded = load_file(str(out / "model.safetensors"))
    assert set(loaded) == {"w", "b"} and torch.equal(loaded["w"], _state()["model"]["w"])
    code, _, err = run(capsys, "export", tmp_path / "run", "--format", "hf", out)
    assert code == EXIT_USAGE and "--overwrite" in one_error_line(err)
    code, _, err = run(capsys, "export", tmp_path / "run", "--format", "hf", out, "--overwrite", "--dtype", "fp16",
                       "--max-shard-size", "100")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                       "model.safetensors.index.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == (60 + 6) * 2
    assert load_file(str(out / index["weight_map"]["w"]))["w"].dtype == torch.float16


def test_opaque_values_through_the_writer_need_allow_pickle(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.ones(2)}, "fn": torch.float8_e4m3fn}
    dcp.save(state, storage_writer=ckpt.dcp.Writer(str(tmp_path / "run"), step=1, layout="packs"))
    with pytest.raises(ckpt.UnsupportedValueError, match="allow_pickle"):
        ckpt.read(str(tmp_path / "run"))
    assert ckpt.read(str(tmp_path / "run"), allow_pickle=True)["fn"] is torch.float8_e4m3fn
