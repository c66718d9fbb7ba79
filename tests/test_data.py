"Fetching, caching and validating the real data: what the notebook's own tests cannot show."
import subprocess

import pytest

import reco_lab.data as data
from reco_lab.data import DataError, load_movielens_100k, ml100k_files


def test_movielens_counts_and_features():
    ml = load_movielens_100k()
    assert len(ml.interactions) == 100_000
    assert ml.interactions.user_id.nunique() == 943 and ml.interactions.item_id.nunique() == 1682
    assert set(ml.users.columns) >= {"age", "gender", "occupation"}
    assert ml.items.genres.str.contains("Comedy").sum() > 400


def test_cache_is_reused_without_download(tmp_path, monkeypatch):
    ml100k_files(tmp_path)

    def no_download(*a, **k):
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert ml100k_files(tmp_path) == tmp_path / "ml-100k"


def test_a_failed_download_says_so_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "ML100K_WHEEL", "recbole==0.0.0.dev424242")
    with pytest.raises(DataError, match="could not download MovieLens-100k"):
        ml100k_files(tmp_path)
    assert not (tmp_path / "ml-100k").exists()


def test_a_checksum_mismatch_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(data.ML100K_SHA256, "ml-100k.user", "0" * 64)
    with pytest.raises(DataError, match="fail their sha256 check: ml-100k.user"):
        ml100k_files(tmp_path)
    assert not (tmp_path / "ml-100k").exists()
