import numpy as np

from ichseg.engine.data import multiclass_targets, split_by_group


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


def test_multiclass_targets():
    labels = np.array([[0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 1], [1, 1, 0, 0, 0, 0]], np.float32)
    assert multiclass_targets(labels, ["normal", "hemorrhage"]).tolist() == [0, 1, 1]
    classes = ["normal", "subdural", "intraparenchymal", "epidural"]
    assert multiclass_targets(labels, classes).tolist() == [0, 1, 3]
