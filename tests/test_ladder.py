import polars as pl
import pytest

from cascade.errors import LogFormatError
from cascade.ladder import load_ladder
from tests.synthetic import three_tier


@pytest.fixture
def logs():
    return three_tier(30, seed=1)


def test_pivot_and_schema(logs):
    logs = logs.with_columns(reference=pl.lit("yes"))
    ladder = load_ladder(logs.sample(fraction=1, shuffle=True, seed=0), require_quality=True)
    assert ladder.n_tiers == 3 and len(ladder) == 30
    # rows come back aligned across tiers whatever the input order
    i = list(ladder.row_ids).index("r7")
    expect = logs.filter(pl.col("row_id") == "r7").sort("tier")
    assert list(ladder.quality[:, i]) == expect["quality"].to_list()
    assert list(ladder.prompt_text) == ["category"]
    assert list(ladder.output_num) == ["mean_logprob"]
    assert "reference" not in ladder.prompt_text      # could carry the answer key


def test_missing_column_is_named(logs):
    with pytest.raises(LogFormatError, match="output"):
        load_ladder(logs.drop("output"))


def test_ragged_ladder_names_the_row(logs):
    with pytest.raises(LogFormatError, match="'r3'.*tiers \\[0, 2\\]"):
        load_ladder(logs.filter(~((pl.col("row_id") == "r3") & (pl.col("tier") == 1))))


def test_duplicate_row_and_tier_is_named(logs):
    with pytest.raises(LogFormatError, match="'r0' appears twice at tier 0"):
        load_ladder(pl.concat([logs, logs.head(1)]))


def test_bad_quality_value_names_row(logs):
    logs = logs.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(pl.lit("high"))
                             .otherwise(pl.col("quality").cast(pl.String)).alias("quality"))
    with pytest.raises(LogFormatError, match="quality.*row_id 'r1'"):
        load_ladder(logs, require_quality=True)


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_text("not parquet")
    with pytest.raises(LogFormatError, match="x.parquet"):
        load_ladder(bad)


def test_frames_from_other_libraries_are_accepted(logs):
    """A pyarrow Table, or a dict of columns, loads the same as the polars frame."""
    a = load_ladder(logs, require_quality=True)
    for other in (logs.to_arrow(), logs.to_dict(as_series=False)):
        b = load_ladder(other, require_quality=True)
        assert list(b.row_ids) == list(a.row_ids) and (b.quality == a.quality).all()


def test_tier_must_be_complete(logs):
    with pytest.raises(LogFormatError, match="0..n-1 with none missing"):
        load_ladder(logs.filter(pl.col("tier") != 1))
