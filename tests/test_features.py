import numpy as np
import pytest

from cascade.features import Observations, StateFeaturizer, extract_answer, observe_all
from cascade.ladder import load_ladder
from tests.synthetic import three_tier


@pytest.mark.parametrize("text,answer,strength", [
    (" Let's think. The answer is (B).\n\nQuestion: ... The answer is (C).", "b", 2),
    ("so #### 1,000.0", "1000", 2),
    ("The final answer is \\boxed{42}", "42", 2),
    ("positive", "positive", 1),
    ("A long explanation without any conclusion whatsoever given", "", 0),
])
def test_extract_answer(text, answer, strength):
    assert extract_answer(text) == (answer, strength)


def test_state_features_use_only_revealed_tiers():
    ladder = load_ladder(three_tier(20, seed=2), require_quality=True)
    full = observe_all(ladder)
    feats = StateFeaturizer.fit(full)
    partial = Observations(ladder.prompts, ladder.prompt_text, ladder.prompt_num)
    partial.reveal(0, ladder.outputs[0], ladder.cost[0], {k: v[0] for k, v in ladder.output_num.items()})
    np.testing.assert_array_equal(feats(partial, (0,)), feats(full, (0,)))
    with pytest.raises(KeyError):
        feats(partial, (0, 2))
