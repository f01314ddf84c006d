import json

import numpy as np
import pytest

from ichseg.engine.splits import load_splits, save_splits, split_by_group
from ichseg.engine.targets import multiclass_targets
from ichseg.errors import InputError


def _groups(n_patients=40, slices=12, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{i:03d}" for i in range(n_patients)], slices)
    patient_positive = rng.random(n_patients) < 0.5
    positive = np.repeat(patient_positive, slices) & (rng.random(len(groups)) < 0.4)
    return groups, positive


def test_no_patient_in_two_splits():
    groups, positive = _groups()
    splits = split_by_group(groups, positive, 0.2, 0.2, seed=3)
    seen = [set(groups[idx]) for idx in splits.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    # every slice is in exactly one split
    all_idx = np.concatenate(list(splits.values()))
    assert sorted(all_idx.tolist()) == list(range(len(groups)))


def test_kfold_partitions_patients_and_is_stratified():
    groups, positive = _groups(n_patients=30)
    test_sets = []
    for fold in range(5):
        splits = split_by_group(groups, positive, 0.2, 0.0, seed=1, folds=5, fold=fold)
        test_patients = set(groups[splits["test"]])
        assert not test_patients & set(groups[splits["train"]])
        assert not test_patients & set(groups[splits["val"]])
        assert positive[splits["test"]].any()
        test_sets.append(test_patients)
    assert set().union(*test_sets) == set(groups)
    assert sum(len(s) for s in test_sets) == len(set(groups))


def test_split_is_deterministic_for_a_seed():
    groups, positive = _groups()
    a = split_by_group(groups, positive, 0.2, 0.2, seed=9)
    b = split_by_group(groups, positive, 0.2, 0.2, seed=9)
    c = split_by_group(groups, positive, 0.2, 0.2, seed=10)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_saved_split_is_what_later_steps_read(tmp_path):
    groups, positive = _groups()
    splits = split_by_group(groups, positive, 0.2, 0.2, seed=3)
    save_splits(splits, groups, tmp_path / "splits.json")
    again = load_splits(tmp_path / "splits.json", groups)
    assert all(np.array_equal(np.sort(splits[k]), again[k]) for k in splits)
    # Reading is not recomputing: another seed or other rows never move a patient.
    shuffled = groups[::-1]
    moved = load_splits(tmp_path / "splits.json", shuffled)
    assert set(shuffled[moved["test"]]) == set(groups[splits["test"]])


def test_saved_split_refuses_unknown_or_doubled_patients(tmp_path):
    groups, positive = _groups(n_patients=10)
    save_splits(split_by_group(groups, positive, 0.2, 0.2, seed=3), groups, tmp_path / "s.json")
    with pytest.raises(InputError, match="in no split"):
        load_splits(tmp_path / "s.json", np.array(["P000", "someone-new"]))
    data = json.loads((tmp_path / "s.json").read_text())
    data["val"].append(data["test"][0])
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="both"):
        load_splits(tmp_path / "s.json", groups)


def test_multiclass_targets_never_make_a_bleed_normal():
    labels = np.array(
        [
            [0, 0, 0, 0, 0, 0],  # normal
            [1, 0, 0, 0, 0, 1],  # subdural only
            [1, 1, 0, 0, 0, 0],  # epidural only
            [1, 0, 1, 0, 0, 1],  # intraparenchymal and subdural
            [1, 0, 0, 0, 1, 0],  # subarachnoid: not a listed class
        ],
        np.float32,
    )
    assert multiclass_targets(labels, ["normal", "hemorrhage"]).tolist() == [0, 1, 1, 1, 1]
    classes = ["normal", "subdural", "intraparenchymal", "epidural", "multiple", "other_hemorrhage"]
    assert multiclass_targets(labels, classes).tolist() == [0, 1, 3, 4, 5]
    # Without a class to hold them, the data cannot be mapped: an error, never "normal".
    with pytest.raises(InputError, match="2 positive slice.*"):
        multiclass_targets(labels[[0, 1, 4, 4]], ["normal", "subdural", "epidural"])
    with pytest.raises(InputError, match="more than one listed subtype.*'multiple'"):
        multiclass_targets(labels, ["normal", "subdural", "intraparenchymal", "epidural"])
    unknown = np.array([[1, np.nan, np.nan, np.nan, np.nan, np.nan]], np.float32)
    assert multiclass_targets(unknown, ["normal", "epidural", "other_hemorrhage"]).tolist() == [2]
