"""Class descriptions: bundled files cover every dataset, user files load, gaps are clear errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from fedprompt.learners import create_learner
from fedprompt.learners.frozen_text import encode_sentences
from fedprompt.text.descriptions import (
    DESCRIPTIONS_DIR,
    DescriptionsError,
    bundled_description_sets,
    find_bundled_set,
    load_descriptions,
    read_description_file,
)

DATASET_CONFIGS = Path(__file__).parents[1] / "configs" / "dataset"
DATASETS = {
    path.stem: yaml.safe_load(path.read_text()).get("classnames")
    for path in sorted(DATASET_CONFIGS.glob("*.yaml"))
}
NAMED = {name: classes for name, classes in DATASETS.items() if classes}
BTMRI = NAMED["btmri"]


def test_every_dataset_with_class_names_has_bundled_descriptions():
    assert set(NAMED) <= set(bundled_description_sets())
    for name, classes in NAMED.items():
        assert find_bundled_set(classes) is not None, name
        found = load_descriptions(classes, name)
        assert list(found) == classes


@pytest.mark.parametrize("path", sorted(DESCRIPTIONS_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_bundled_files_match_their_datasets_and_hold_ten_distinct_sentences(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["dataset"] == path.stem and data["modality"]
    for dataset in data["datasets"]:
        assert list(data["classes"]) == DATASETS[dataset], dataset
    for name, sentences in data["classes"].items():
        assert len(sentences) >= 10 and len(set(sentences)) == len(sentences), name
        assert all(isinstance(s, str) and s.strip() == s and s.endswith(".") for s in sentences)


def test_a_user_file_in_biomedcoop_layout_loads_with_lenient_names(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"Glioma_Tumor": ["one"], "meningioma tumor": ["two", "three"]}))
    found = load_descriptions(["glioma tumor", "meningioma  tumor"], path)
    assert found["glioma tumor"] == ("one",) and found["meningioma  tumor"] == ("two", "three")
    assert found.source == str(path)


def test_a_set_can_be_named_by_any_dataset_it_declares():
    classes = NAMED["medmnist_octmnist"]
    assert load_descriptions(classes, "medmnist_octmnist").sentences == dict(
        load_descriptions(classes, "octmnist").sentences
    )


def test_a_class_without_sentences_names_the_class_and_the_way_out(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"classes": {"glioma tumor": ["x"], "normal brain": []}}))
    with pytest.raises(
        DescriptionsError, match=r"\['meningioma tumor', 'pituitary tumor', 'normal brain'\]"
    ):
        load_descriptions(BTMRI, path)
    with pytest.raises(DescriptionsError, match=r"method\.descriptions="):
        load_descriptions(BTMRI, path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not readable JSON"),
        ("[]", "must map class names"),
        ('{"a": "text"}', "list of"),
    ],
)
def test_malformed_files_are_reported(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DescriptionsError, match=message):
        read_description_file(path)


def test_missing_file_and_unknown_classes_are_reported(tmp_path):
    with pytest.raises(DescriptionsError, match="does not exist"):
        load_descriptions(BTMRI, tmp_path / "absent.json")
    with pytest.raises(DescriptionsError, match="no bundled class descriptions"):
        load_descriptions(["cat", "dog"])


def test_classes_shared_by_several_sets_must_be_disambiguated():
    with pytest.raises(DescriptionsError, match="several bundled description sets"):
        find_bundled_set(["normal"])
    assert find_bundled_set(["normal", "pneumonia"]) == "pneumoniamnist"
    assert find_bundled_set(["glioma tumor", "normal brain"]) == "btmri"  # base classes


def test_learners_read_a_user_file_and_fail_clearly_without_one(miniature_backbone, tmp_path):
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({"cat": ["a small cat.", "a cat."], "dog": ["a dog."]}))
    learner = create_learner(
        "biomedcoop", miniature_backbone, ["cat", "dog"], descriptions=str(path)
    )
    assert learner.description_source == str(path)
    assert learner.teacher.bank.shape[:2] == (2, 2)  # the dog's one sentence repeats
    torch.testing.assert_close(learner.teacher.bank[1, 0], learner.teacher.bank[1, 1])
    with pytest.raises(DescriptionsError, match=r"method\.descriptions"):
        create_learner("biomedcoop", miniature_backbone, ["cat", "dog"])


def test_zero_shot_ensembles_descriptions_when_a_set_covers_the_classes(miniature_backbone):
    with_descriptions = create_learner("zeroshot", miniature_backbone, BTMRI)
    assert with_descriptions.description_source == "btmri"
    template_only = create_learner("zeroshot", miniature_backbone, BTMRI, use_descriptions=False)
    assert not torch.allclose(with_descriptions.text_features(), template_only.text_features())
    fallback = create_learner("zeroshot", miniature_backbone, ["cat", "dog"])
    assert fallback.description_source is None
    expected = encode_sentences(miniature_backbone, ["a photo of a cat.", "a photo of a dog."])
    torch.testing.assert_close(fallback.text_features(), expected)


@pytest.mark.parametrize("fixture", ["miniature_backbone", "miniature_native_backbone"])
def test_sentence_features_equal_the_untrimmed_text_tower(request, fixture):
    backbone = request.getfixturevalue(fixture)
    sentences = [*load_descriptions(BTMRI)["glioma tumor"][:3], "a photo of a glioma tumor."]
    expected = backbone.encode_text(backbone.tokenizer(sentences))
    torch.testing.assert_close(
        encode_sentences(backbone, sentences), expected, rtol=1e-4, atol=1e-5
    )
