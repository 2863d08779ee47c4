"""The authors' descriptions: fetched (never from the network here), checked, converted, used."""

import hashlib
import json

import pytest
from no_network import cut_network

from fedprompt import cli
from fedprompt.learners import create_learner
from fedprompt.text import author_descriptions
from fedprompt.text.author_descriptions import (
    AUTHOR_SOURCES,
    AuthorDescriptionsError,
    AuthorSource,
    download_author_descriptions,
)
from fedprompt.text.descriptions import DescriptionsError, load_descriptions

CLASSES = ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
# A stand-in for the published trainers/prompt_templates.py: the same shape, a few sentences.
PUBLISHED = b"""CUSTOM_TEMPLATES = {"BTMRI": "a photo of a {}."}

BIOMEDCOOP_TEMPLATES = {
    "normal brain": ["A brain with no lesion.", "Symmetric ventricles."],
    "glioma tumor": ["An infiltrative mass.", "Irregular enhancement."],
    "meningioma tumor": ["A dural-based mass.", "A dural tail."],
    "pituitary tumor": ["A sellar mass.", "Suprasellar extension."],
    "polyp": ["A protruding lesion."],
}
"""


@pytest.fixture
def published(monkeypatch, tmp_path):
    """The btmri entry points at ``PUBLISHED``'s checksum; the cache is a fresh folder; online."""
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    digest = hashlib.sha256(PUBLISHED).hexdigest()
    monkeypatch.setitem(AUTHOR_SOURCES, "btmri", AuthorSource(sha256=digest))
    monkeypatch.setattr(author_descriptions, "unreachable", lambda url: None)
    calls = []

    def fetch(url):
        calls.append(url)
        return PUBLISHED

    monkeypatch.setattr(author_descriptions, "fetch_bytes", fetch)
    return calls


def test_registry_pins_the_authors_file_by_commit_and_checksum():
    for source in AUTHOR_SOURCES.values():
        assert source.url.startswith("https://raw.githubusercontent.com/HealthX-Lab/BiomedCoOp/")
        assert author_descriptions.BIOMEDCOOP_COMMIT in source.url
        assert len(source.sha256) == 64
    assert AUTHOR_SOURCES["octmnist"].aliases == {"normal": "normal OCT scan"}


def test_download_with_the_right_bytes_is_usable(published, tmp_path):
    path = download_author_descriptions("btmri", CLASSES)
    assert path == tmp_path / "cache" / "descriptions" / "biomedcoop" / "btmri.json"
    data = json.loads(path.read_text())
    assert list(data["classes"]) == CLASSES  # only the dataset's classes, in label order
    assert data["classes"]["normal brain"] == ["A brain with no lesion.", "Symmetric ventricles."]
    assert published == [AUTHOR_SOURCES["btmri"].url]
    found = load_descriptions(CLASSES, path)
    assert found["glioma tumor"] == ("An infiltrative mass.", "Irregular enhancement.")


def test_wrong_bytes_are_refused_and_nothing_is_kept(published, tmp_path):
    with pytest.raises(AuthorDescriptionsError, match="refused and nothing was kept") as err:
        download_author_descriptions("btmri", CLASSES, fetch=lambda url: PUBLISHED + b"# x\n")
    assert "\n" not in str(err.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


def test_offline_is_one_sentence_naming_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path))
    attempts = cut_network(monkeypatch)
    with pytest.raises(AuthorDescriptionsError) as err:
        download_author_descriptions("btmri", CLASSES, fetch=pytest.fail)
    message = str(err.value)
    assert "`fedprompt data descriptions btmri`" in message and "\n" not in message
    assert len(attempts) <= 1
    assert not any(tmp_path.iterdir())


def test_cli_downloads_into_the_cache(published, tmp_path, capsys):
    assert cli.main(["data", "descriptions", "btmri"]) == 0
    assert "method.descriptions=authors" in capsys.readouterr().out
    assert (tmp_path / "cache" / "descriptions" / "biomedcoop" / "btmri.json").is_file()


def test_offline_cli_exits_with_the_sentence(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path))
    cut_network(monkeypatch)
    code = cli.main(["data", "descriptions", "btmri"])
    assert code != 0
    err = capsys.readouterr().err
    assert "fedprompt data descriptions btmri" in err
    assert "Traceback" not in err


def test_authors_descriptions_load_from_the_cache(published, miniature_backbone):
    download_author_descriptions("btmri", CLASSES)
    found = load_descriptions(CLASSES, "authors")
    assert found["pituitary tumor"] == ("A sellar mass.", "Suprasellar extension.")
    learner = create_learner("biomedcoop", miniature_backbone, CLASSES, descriptions="authors")
    assert learner.description_source == "authors"


def test_authors_not_downloaded_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path))
    with pytest.raises(DescriptionsError) as err:
        load_descriptions(CLASSES, "authors")
    message = str(err.value)
    assert "run `fedprompt data descriptions btmri`" in message and "\n" not in message


def test_a_class_missing_from_the_published_file_is_refused(published):
    with pytest.raises(AuthorDescriptionsError, match=r"\['edema'\]"):
        download_author_descriptions("btmri", [*CLASSES, "edema"])


def test_simulate_stops_before_flower_when_the_authors_are_not_downloaded(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code = cli.main(
        [
            "simulate",
            "quickstart",
            "method=biomedcoop",
            "method.descriptions=authors",
            f"output_dir={out}",
        ]
    )
    assert code == 2
    assert "run `fedprompt data descriptions btmri`" in capsys.readouterr().err
    assert not out.exists()
