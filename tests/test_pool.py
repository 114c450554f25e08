"""The unlabeled pool: validation cases, the test split and copies of either never enter it."""

from __future__ import annotations

import pytest

from nnunet_ext.data.pool import build_pool


def test_pool_excludes_validation_test_and_copies():
    pool = build_pool(beyond_budget=["a", "b", "v1"], folder_ids=["u1", "u2", "t1", "copy_v", "copy_t", "a", "l1"],
                      labeled=["l1", "l2"], validation=["v1", "v2"], test={"t1", "t2"},
                      duplicates={"copy_v": "imagesTr/v2", "copy_t": "imagesTs/t2", "u2": "imagesTr/zz"})
    assert sorted(pool.ids) == ["a", "b", "u1", "u2"]
    assert set(pool.excluded) == {"v1", "t1", "copy_v", "copy_t", "l1", "imagesUnlabeled/a"}
    assert "validation" in pool.excluded["copy_v"] and "test" in pool.excluded["copy_t"]
    assert pool.source["a"].startswith("fold training") and pool.source["u1"] == "imagesUnlabeled"
    assert pool.select(2) == pool.ids[:2] and pool.select(None) == pool.ids
    with pytest.raises(ValueError, match="5 unlabeled images requested but the pool has only 4"):
        pool.select(5)
    again = build_pool(["a", "b"], ["u1", "u2"], [], [], set())
    assert again.ids == build_pool(["b", "a"], ["u2", "u1"], [], [], set()).ids  # deterministic
