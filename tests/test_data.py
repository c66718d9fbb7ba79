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


# --- Kion files a careless user or an attacker could hand over (issue 14, items 6 and 7) ----------------------


def kion_folder(tmp_path, edit_interactions=None):
    "A small valid Kion folder from synthetic data; `edit_interactions(lines)` rewrites interactions.csv."
    from reco_lab.data import make_synthetic, write_kion

    folder = write_kion(make_synthetic(300, 100, 2_000, seed=3), tmp_path / "kion")
    if edit_interactions:
        path = folder / "interactions.csv"
        path.write_text(edit_interactions(path.read_text().splitlines()))
    return folder


def with_value(column: str, value: str, line: int = 7):
    "Put `value` into `column` on file line `line` (1 = the header)."
    from reco_lab.data import KION_COLUMNS

    def edit(lines):
        cells = lines[line - 1].split(",")
        cells[KION_COLUMNS["interactions.csv"].index(column)] = value
        return "\n".join(lines[: line - 1] + [",".join(cells)] + lines[line:]) + "\n"

    return edit


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("user_id", "99999999999999999999", "does not fit a 64-bit integer"),
        ("item_id", "1.5", "is not an integer"),
        ("total_dur", "inf", "is not a finite number"),
        ("watched_pct", "-inf", "is not a finite number"),
        ("user_id", "-1", "is negative"),
        ("item_id", "1e3", "is not written as an integer (exponent notation)"),
        ("last_watch_dt", "2099-12-31", "is in the future"),
    ],
)
def test_kion_rejects_values_pandas_would_silently_change(tmp_path, column, value, message):
    from reco_lab.data import load_kion

    folder = kion_folder(tmp_path, with_value(column, value))
    with pytest.raises(DataError) as raised:
        load_kion(folder)
    text = str(raised.value)
    assert text.startswith(f"{folder / 'interactions.csv'}: column {column!r}, line 7: {value!r} {message}"), text


def after_blank_lines_and_a_quoted_field(lines):
    "interactions.csv with two blank lines and a quoted cell over three lines before the row on line 10."
    from reco_lab.data import KION_COLUMNS

    cells = lines[1].split(",")
    cells[KION_COLUMNS["interactions.csv"].index("watched_pct")] = '"12\n\n"'  # lines 4-6, one row for csv
    bad = lines[4].split(",")
    bad[KION_COLUMNS["interactions.csv"].index("user_id")] = "1e3"
    return "\n".join([lines[0], "", "", ",".join(cells), lines[2], lines[3], ",".join(bad), *lines[5:]]) + "\n"


def test_kion_errors_name_the_line_an_editor_shows(tmp_path):
    "pandas skips blank lines and reads a quoted cell over several lines as one row: the line counted is the file's."
    from reco_lab.data import load_kion

    folder = kion_folder(tmp_path, after_blank_lines_and_a_quoted_field)
    assert (folder / "interactions.csv").read_text().splitlines()[8].startswith("1e3,")  # line 9
    with pytest.raises(DataError, match=r"column 'user_id', line 9: '1e3' is not written as an integer"):
        load_kion(folder)


def test_kion_refuses_a_column_named_twice(tmp_path):
    from reco_lab.data import load_kion

    folder = kion_folder(tmp_path, lambda lines: "\n".join([lines[0] + ",item_id", *[x + ",1" for x in lines[1:]]]))
    with pytest.raises(DataError, match=r"interactions.csv: column\(s\) 'item_id' appear more than once in the header"):
        load_kion(folder)


@pytest.mark.parametrize("content,message", [("", "is empty"), (None, "has a header but no rows")])
def test_kion_empty_or_header_only_file_is_one_clear_error(tmp_path, content, message):
    from reco_lab.data import load_kion

    folder = kion_folder(tmp_path, lambda lines: (lines[0] + "\n") if content is None else content)
    with pytest.raises(DataError, match=f"interactions.csv {message}"):
        load_kion(folder)


def test_the_cli_stops_before_any_training_with_one_line(tmp_path, mlflow_uri):
    "The id that used to become INT64_MIN (and a study that exited 0), and the header-only file (ZeroDivisionError)."
    from support import reco_lab, study_dirs

    bad_id = kion_folder(tmp_path / "a", with_value("user_id", "99999999999999999999"))
    done = reco_lab(
        "run", "--dataset", f"kion:{bad_id}", "--quick", "--only", "popular", *study_dirs(tmp_path), timeout=300
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{bad_id / 'interactions.csv'}: column 'user_id', line 7: '99999999999999999999'" in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.ipynb"))  # nothing ran
    header_only = kion_folder(tmp_path / "b", lambda lines: lines[0] + "\n")
    done = reco_lab("summary", "--dataset", f"kion:{header_only}", timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr[-2000:]
    assert "interactions.csv has a header but no rows" in done.stderr
