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
