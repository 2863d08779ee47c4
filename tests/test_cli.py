import json
import time

import pytest
import yaml
from no_network import cut_network
from sites_on_disk import corrupt_one_image, write_site

from fedprompt.backbones import default_cache_dir, load_backbone
from fedprompt.cli import main
from fedprompt.config import compose_config
from fedprompt.federation.checkpoint import CHECKPOINT_NAME
from fedprompt.results import ResultsFolder


def test_config_command_prints_the_composed_config(capsys):
    assert main(["config", "quickstart", "federation.rounds=9"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["federation"]["rounds"] == 9 and cfg["experiment_name"] == "quickstart"


def test_missing_dataset_stops_with_one_sentence_before_flower_starts(tmp_path, capsys):
    code = main(
        [
            "simulate",
            "quickstart",
            f"dataset.root={tmp_path}",
            "dataset.synthetic_fallback=false",
            f"output_dir={tmp_path / 'out'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedprompt: Dataset BTMRI was not found")
    assert "fedprompt data download btmri" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_override_is_one_sentence(capsys):
    assert main(["config", "quickstart", "train.no_such_key=1"]) == 2
    assert "Cannot compose" in capsys.readouterr().err


def test_unknown_experiment_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "no-such-experiment"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_save_local_rehomes_a_local_copy(tmp_path, capsys):
    load_backbone("miniature")
    source = default_cache_dir() / "miniature-v1"
    assert (
        main(["backbone", "save-local", str(tmp_path / "copy"), "--source", f"local-dir:{source}"])
        == 0
    )
    assert "backbone=local_dir" in capsys.readouterr().out
    copy = load_backbone(f"local-dir:{tmp_path / 'copy'}")
    assert copy.embed_dim == load_backbone("miniature").embed_dim


def test_site_check_prints_counts_and_exits_zero_for_a_good_site(tmp_path, capsys):
    config = write_site(tmp_path, "hospital-a")
    assert main(["site", "check", str(config), "--experiment", "quickstart"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Site hospital-a: 4 classes") and "this site can join" in out


def test_site_check_lists_the_problems_and_exits_one(tmp_path, capsys):
    config = write_site(tmp_path, "hospital-x")
    bad = corrupt_one_image(config)
    assert main(["site", "check", str(config)]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and str(bad) in out


def test_site_check_of_a_missing_config_is_one_sentence(tmp_path, capsys):
    assert main(["site", "check", str(tmp_path / "site.yaml")]) == 2
    assert "site.example.yaml" in capsys.readouterr().err


def test_simulate_resume_without_a_checkpoint_stops_before_flower_starts(tmp_path, capsys):
    assert main(["simulate", "quickstart", f"resume={tmp_path}"]) == 2
    assert "not a fedprompt results folder" in capsys.readouterr().err
    ResultsFolder(tmp_path).write_config(compose_config("quickstart"))
    code = main(["simulate", "quickstart", f"resume={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "no round of a run completed there" in err
    assert len(err.strip().splitlines()) == 1


def _stopped_run(folder):
    """A results folder as a quickstart run leaves it after round 1."""
    results = ResultsFolder(folder)
    results.write_config(compose_config("quickstart", [f"output_dir={folder}"]))
    checkpoint = {"format": 1, "round": 1, "global_state": {}, "strategy_state": {}}
    results.save_torch(CHECKPOINT_NAME, checkpoint | {"random_state": {}, "initial": None})


def test_simulate_resume_with_other_settings_stops_before_flower_starts(tmp_path, capsys):
    _stopped_run(tmp_path)
    assert main(["simulate", "quickstart", f"resume={tmp_path}", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "must keep the settings it started with (train.lr was 0.1, now 0.5)" in err


def test_simulate_resume_writes_on_into_the_resumed_folder(tmp_path, monkeypatch, capsys):
    from fedprompt.federation import local_simulation

    _stopped_run(tmp_path / "run")
    seen = {}

    def fake_simulate(experiment, overrides, cfg, **output):
        seen.update(overrides=overrides, cfg=cfg, output=output)
        summary = {
            "status": "completed",
            "experiment": experiment,
            "dataset": "BTMRI",
            "wall_seconds": 1.0,
            "final": {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5, "source": "x"},
        }
        (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
        return 0

    monkeypatch.setattr(local_simulation, "simulate", fake_simulate)
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "quickstart", "resume=run", "federation.rounds=3"]) == 0
    assert f"results in {tmp_path / 'run'}" in capsys.readouterr().out
    folder = str(tmp_path / "run")
    assert seen["cfg"].resume == folder and seen["cfg"].output_dir == folder
    assert seen["overrides"][-2:] == [f"resume={folder}", f"output_dir={folder}"]
    # Flower's log is appended to the resumed folder's, beside what the first session wrote.
    assert seen["output"] == {"flower_log": tmp_path / "run" / "flower.log", "verbose": False}


def test_download_without_network_is_one_sentence_within_seconds(tmp_path, monkeypatch, capsys):
    attempts = cut_network(monkeypatch)
    started = time.monotonic()
    assert main(["data", "download", "btmri", "--root", str(tmp_path / "data")]) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert err.startswith("fedprompt: Downloading BTMRI.zip from the Hugging Face dataset")
    assert "huggingface.co:443 cannot be reached" in err and "place it by hand" in err
    assert len(err.strip().splitlines()) == 1 and len(attempts) == 1
    assert not (tmp_path / "data").exists()


def test_save_local_without_network_is_one_sentence(tmp_path, monkeypatch, capsys):
    cut_network(monkeypatch)
    assert main(["backbone", "save-local", str(tmp_path / "copy")]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "on a machine with network" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "copy").exists()
