"""compress_checkpoint's error paths and rare branches that tests/test_compress_checkpoint.py does not reach:
corrupt safetensors files and indexes, settings and patterns that choose nothing, another run's manifest,
merge refusing or cleaning up, the progress display's modes, a failing unit on one rank or several."""
from __future__ import annotations

import json
import struct
import sys

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from test_compress_checkpoint import make_llama  # noqa: E402

from mpo_core.compress_checkpoint import Settings, compress_checkpoint, merge_checkpoint, report, run  # noqa: E402
from mpo_core.compress_checkpoint.files import (TensorEntry, checkpoint_tensors, read_header, read_tensor,  # noqa: E402
                                                safetensors_module, tensor_bytes, write_safetensors)
from mpo_core.compress_checkpoint.plan import (FORMAT, LEDGER_DIR, MANIFEST_NAME, VERSION, Unit, _differences,  # noqa: E402
                                               check_linear_layout, lock_output, plan_units, prepare_output)


def _raw_file(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def test_corrupt_safetensors_headers_are_named(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=r"short.safetensors: corrupt safetensors file \(2 bytes, no header\)"):
        read_header(str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="corrupt safetensors header \\(not a JSON object\\)"):
        read_header(_raw_file(tmp_path / "list.safetensors", [1, 2]))
    with pytest.raises(ValueError, match="corrupt safetensors header \\(entry 'w': \\{'dtype': 'F32'\\}\\)"):
        read_header(_raw_file(tmp_path / "entry.safetensors", {"w": {"dtype": "F32"}}))
    with pytest.raises(ValueError, match="tensor 'w' has dtype 'Q9', which this reader does not know"):
        read_header(_raw_file(tmp_path / "dtype.safetensors", {"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}},
                              b"\0" * 8))
    with pytest.raises(ValueError, match=r"tensor 'w': bytes 0..12 for shape \[2\] F32, data size 12"):
        read_header(_raw_file(tmp_path / "range.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}},
                              b"\0" * 12))


def test_checkpoint_folders_that_cannot_be_read(tmp_path):
    with pytest.raises(ValueError, match="is not a folder \\(a transformers checkpoint folder is expected\\)"):
        checkpoint_tensors(str(tmp_path / "nowhere"))
    (empty := tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no \\*.safetensors file"):
        checkpoint_tensors(str(empty))
    (two := tmp_path / "two").mkdir()  # no index, no model.safetensors: every *.safetensors file
    safetensors_torch.save_file({"a": torch.ones(2)}, str(two / "x.safetensors"))
    safetensors_torch.save_file({"b": torch.ones(3)}, str(two / "y.safetensors"))
    entries, paths = checkpoint_tensors(str(two))
    assert [e.name for e in entries] == ["a", "b"] and sorted(paths) == ["x.safetensors", "y.safetensors"]
    safetensors_torch.save_file({"a": torch.zeros(2)}, str(two / "z.safetensors"))
    with pytest.raises(ValueError, match="tensor 'a' is in two shards \\(x.safetensors, z.safetensors\\)"):
        checkpoint_tensors(str(two))
    (two / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a safetensors index"):
        checkpoint_tensors(str(two))
    (two / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x.safetensors", "b": "x.safetensors"}}))
    with pytest.raises(ValueError, match="tensor 'b' is mapped to 'x.safetensors', which does not hold it"):
        checkpoint_tensors(str(two))


def test_tensors_that_cannot_be_read_or_written(tmp_path, monkeypatch):
    path = str(tmp_path / "t.safetensors")
    safetensors_torch.save_file({"a": torch.arange(4.0)}, path)
    entry = read_header(path)["a"]
    assert torch.equal(read_tensor(entry), torch.arange(4.0))
    with pytest.raises(ValueError, match="t.safetensors: cannot read tensor 'nope'"):
        read_tensor(TensorEntry("nope", path, "F32", (4,), entry.start, entry.end))
    with pytest.raises(ValueError, match="cannot write a torch.int64 tensor \\(float64/32/16 and bfloat16 only\\)"):
        tensor_bytes(torch.arange(3))
    past_end = TensorEntry("a", path, "F32", (8,), entry.start, entry.start + 32)  # the file holds 16 bytes of it
    with pytest.raises(ValueError, match="t.safetensors: file ended inside tensor 'a'"):
        write_safetensors(str(tmp_path / "out.safetensors"), [("a", "F32", (8,), past_end)])
    assert not (tmp_path / "out.safetensors").exists()
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="compress_checkpoint reads and writes safetensors checkpoints: pip install"):
        safetensors_module()


def test_settings_and_patterns_that_choose_nothing(tmp_path):
    with pytest.raises(ValueError, match="rel_tol must be in \\[0, 1\\), got 1.5"):
        Settings(rel_tol=1.5)
    with pytest.raises(ValueError, match="dtype must be one of \\['input', .*got 'int8'"):
        Settings(max_bond=2, dtype="int8")
    tensors = [TensorEntry("l.weight", "s.safetensors", "F32", (4, 4), 0, 64),
               TensorEntry("l.scale", "s.safetensors", "F32", (4, 4), 64, 128)]
    with pytest.raises(ValueError, match="include pattern 'q_proj' matches no 2-D tensor of the checkpoint "
                                         "\\(some: l.weight, l.scale\\)"):
        plan_units(tensors, Settings(max_bond=2, include=("q_proj",)))
    with pytest.raises(ValueError, match="no 2-D tensor is chosen by include=\\['\\*.weight'\\] and exclude=\\['l.\\*'\\]"):
        plan_units(tensors, Settings(max_bond=2, exclude=("l.*",)))
    with pytest.raises(ValueError, match="tensor 'l.scale' is chosen but is not a linear layer's weight"):
        plan_units(tensors, Settings(max_bond=2, include=("l.*",), exclude=()))
    for text in ("{not json", "[1, 2]"):  # not JSON; JSON without .get
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match="config.json is not a transformers config"):
            check_linear_layout(str(tmp_path))


def test_another_runs_manifest_and_a_resume_that_clears_leftovers(tmp_path):
    here = {"format": FORMAT, "version": VERSION, "settings": {"max_bond": 4}, "input_shards": {"a": "1", "b": "2"}}
    there = {"format": "other", "version": 0, "settings": {"max_bond": 4}, "input_shards": {"b": "2", "c": "3"}}
    assert _differences(there, here) == ["input shard a is new in the input",
                                         "input shard c was there, is not in the input now",
                                         f"format 'other' v0 there, {FORMAT!r} v{VERSION} now"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file exists and is not a folder: nothing was written"):
        lock_output(str(tmp_path / "file"))
    (out := tmp_path / "out").mkdir()
    (out / MANIFEST_NAME).write_text("{corrupt")
    with pytest.raises(ValueError, match=f"{MANIFEST_NAME} is corrupt .*not resuming into"):
        prepare_output(str(out), here)
    (out / MANIFEST_NAME).write_text(json.dumps(here))
    (out / LEDGER_DIR).mkdir()
    (out / ".mpo-00001.safetensors.123.tmp").write_text("half")
    (out / LEDGER_DIR / ".mpo-00001.json.123.tmp").write_text("half")
    (out / "mpo-00002.safetensors").write_text("kept")
    assert prepare_output(str(out), here) is True  # a resume: a killed run's temporary files are gone
    assert sorted(p.name for p in out.iterdir()) == [LEDGER_DIR, MANIFEST_NAME, "mpo-00002.safetensors"]
    assert list((out / LEDGER_DIR).iterdir()) == []


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    base = tmp_path_factory.mktemp("cc")
    ckpt = make_llama(base / "in", layers=1, shards=2)
    compress_checkpoint(ckpt, base / "out", max_bond=4, progress="none")
    return ckpt, base / "out"


def test_merge_refuses_and_cleans_up(compressed, tmp_path):
    ckpt, out = compressed
    with pytest.raises(ValueError, match="dtype must be one of \\['float64', .*got 'int8'"):
        merge_checkpoint(out, tmp_path / "m", dtype="int8")
    with pytest.raises(ValueError, match="mpo_layout.json not found: not a finished compress_checkpoint output"):
        merge_checkpoint(ckpt, tmp_path / "m")
    (bad_ref := tmp_path / "ref").mkdir()  # a reference without the original matrices: fails midway
    safetensors_torch.save_file({"other": torch.ones(2)}, str(bad_ref / "model.safetensors"))
    (target := tmp_path / "merged").mkdir()
    with pytest.raises(KeyError, match="model.layers.0"):
        merge_checkpoint(out, target, reference=bad_ref, progress="none")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "ref"]  # its temporary folder is gone
    report_ = merge_checkpoint(out, target, progress="none")  # an empty folder is replaced
    assert len(report_["matrices"]) == 7 and report_["worst_rel_error"] is None
    assert (target / "model.safetensors.index.json").is_file()


def test_progress_modes(monkeypatch, capsys):
    with pytest.raises(ValueError, match="progress must be auto, bar, lines or none, got 'loud'"):
        report.Progress(1, 10, "loud")
    bar = report.Progress(2, 20, "bar", "test")
    assert bar.bar is not None and not bar.lines
    bar.update("a", 10)
    bar.update("b", 10)
    assert bar.bar.n == 2
    bar.close()
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # tqdm not installed
    with pytest.raises(ImportError, match="progress='bar' needs tqdm \\(pip install tqdm\\)"):
        report.Progress(1, 10, "bar")
    auto = report.Progress(1, 10, "auto", "test")
    assert auto.bar is None and auto.lines
    auto.update("a", 10)
    assert capsys.readouterr().out.startswith("[test] 1/1 a ")


def test_memory_helpers_without_proc_or_glibc(monkeypatch):
    def no_proc(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(report, "open", no_proc, raising=False)
    assert report.peak_rss_bytes() > 2**20  # ru_maxrss, in bytes
    monkeypatch.setattr(report.ctypes, "CDLL", no_proc)
    assert report.return_freed_memory() is False


def test_summary_names_matrices_larger_than_dense():
    matrix = {"module": "l.0.q", "source": "l.0.q.weight", "entries_dense": 16, "entries_mpo": 32, "rel_bound": 0.0,
              "rel_error": 0.0, "in_features": 4, "out_features": 4, "ranks": [1, 4, 1], "n": 2}
    summary = report.summarize([{"matrix": matrix, "entries": 0}], 1.0, 64, 0)
    assert summary["larger_than_dense"] == ["l.0.q"]
    assert report.format_summary(summary).endswith("larger than dense (bond too high for the shape): l.0.q")


def test_a_failing_unit_on_one_rank_and_on_several(compressed, tmp_path, monkeypatch):
    ckpt, _ = compressed

    def fail(unit, *args):
        raise OSError(f"disk full writing {unit.file}")

    monkeypatch.setattr(run, "run_unit", fail)
    with pytest.raises(OSError, match="disk full writing mpo-00001-of-00007.safetensors"):  # one process: as raised
        compress_checkpoint(ckpt, tmp_path / "one", max_bond=4, progress="none")
    shared = []
    monkeypatch.setattr(run, "_share", lambda obj, world, gather=False: shared.append(obj) or [obj, (None, 0)])
    unit = Unit("mpo-1.safetensors", "matrix", (), 1.0)
    with pytest.raises(RuntimeError, match="compress_checkpoint failed on rank 0: OSError: disk full writing mpo-1"):
        run._work(str(ckpt), str(tmp_path), Settings(max_bond=4), "none", 0, 2, [unit], set(), set(), 0.0, 0)
    assert shared == [("rank 0: OSError: disk full writing mpo-1.safetensors", 0)]  # every rank hears of it
    (tmp_path / "fin" / LEDGER_DIR).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="units without a ledger record after every rank finished: \\['mpo-1"):
        run._finalize(str(ckpt), str(tmp_path / "fin"), [unit])


def test_an_initialized_process_group_is_reused(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, but the group exists already
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert run._distributed() == (0, 1, False)
    finally:
        dist.destroy_process_group()
