import pytest
import yaml

from fedprompt.backbones import default_cache_dir, load_backbone
from fedprompt.cli import main


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
    with pytest.raises(SystemExit):
        main(["simulate", "no-such-experiment"])
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
