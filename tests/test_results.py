import json

import pytest
import torch
from omegaconf import OmegaConf

from fedprompt.results import ResultsFolder


def test_results_folder_writes_every_file(tmp_path):
    results = ResultsFolder(tmp_path / "run")
    results.write_config(OmegaConf.create({"a": 1, "b": "${a}"}))
    results.append_metrics({"round": 1, "loss": 0.5})
    results.append_metrics({"round": 2, "loss": 0.25})
    results.write_json("summary.json", {"ok": True})
    results.save_state({"ctx": torch.ones(2, 3)})
    assert (tmp_path / "run/config.yaml").read_text() == "a: 1\nb: 1\n"
    assert [line["round"] for line in results.read_metrics()] == [1, 2]
    assert json.loads((tmp_path / "run/summary.json").read_text()) == {"ok": True}
    assert torch.equal(torch.load(tmp_path / "run/global_state.pt")["ctx"], torch.ones(2, 3))
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_a_finished_run_is_never_overwritten(tmp_path):
    ResultsFolder(tmp_path).write_json("summary.json", {"done": True})
    with pytest.raises(FileExistsError, match="output_dir"):
        ResultsFolder(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"done": True}


def test_a_resumed_folder_keeps_its_lines_and_drops_the_finished_summary(tmp_path):
    results = ResultsFolder(tmp_path)
    for r in (1, 2, 3):
        results.append_metrics({"round": r})
    results.write_json("summary.json", {"done": True})
    again = ResultsFolder(tmp_path, resume=True)
    assert [line["round"] for line in again.read_metrics()] == [1, 2, 3]
    assert not (tmp_path / "summary.json").exists()
    assert [line["round"] for line in again.keep_metrics_through(2)] == [1, 2]
    assert [line["round"] for line in again.read_metrics()] == [1, 2]


def test_resuming_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ResultsFolder(tmp_path / "nope", resume=True)


def test_save_torch_writes_any_mapping_atomically(tmp_path):
    ResultsFolder(tmp_path).save_torch("checkpoint.pt", {"round": 3, "x": torch.zeros(2)})
    loaded = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert loaded["round"] == 3 and torch.equal(loaded["x"], torch.zeros(2))
    assert not list(tmp_path.glob(".*tmp"))
