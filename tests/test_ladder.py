import numpy as np
import pandas as pd
import pytest

from cascade.errors import LogFormatError
from cascade.ladder import load_ladder
from tests.synthetic import three_tier


@pytest.fixture
def logs():
    return three_tier(30, seed=1)


def test_pivot_and_schema(logs):
    logs = logs.assign(reference="yes")
    ladder = load_ladder(logs.sample(frac=1, random_state=0), require_quality=True)
    assert ladder.n_tiers == 3 and len(ladder) == 30
    # rows come back aligned across tiers whatever the input order
    i = list(ladder.row_ids).index("r7")
    expect = logs[(logs.row_id == "r7")].sort_values("tier")
    assert list(ladder.quality[:, i]) == list(expect.quality)
    assert list(ladder.prompt_text) == ["category"]
    assert list(ladder.output_num) == ["mean_logprob"]
    assert "reference" not in ladder.prompt_text      # could carry the answer key


def test_missing_column_is_named(logs):
    with pytest.raises(LogFormatError, match="output"):
        load_ladder(logs.drop(columns=["output"]))


def test_ragged_ladder_names_the_row(logs):
    with pytest.raises(LogFormatError, match="'r3'.*tiers \\[0, 2\\]"):
        load_ladder(logs[~((logs.row_id == "r3") & (logs.tier == 1))])


def test_duplicate_row_and_tier_is_named(logs):
    with pytest.raises(LogFormatError, match="'r0' appears twice at tier 0"):
        load_ladder(pd.concat([logs, logs.iloc[[0]]]))


def test_bad_quality_value_names_row(logs):
    logs = logs.astype({"quality": object})
    logs.loc[5, "quality"] = "high"
    with pytest.raises(LogFormatError, match="quality.*row_id 'r1'"):
        load_ladder(logs, require_quality=True)


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_text("not parquet")
    with pytest.raises(LogFormatError, match="x.parquet"):
        load_ladder(bad)
