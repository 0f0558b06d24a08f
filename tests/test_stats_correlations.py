"""R_V against behaviour counts each measurement once: identity cells (alpha = 0 mixes,
`self` controls, and the copies a sweep writes for them) are the natural run measured
again, and counting them as points pseudo-replicates the natural rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from rloop_ray.analysis.effects import behaviour_correlations
from rloop_ray.vocab import MIX, NATURAL, PATCH, SELF, STATUS_OK


def _cells(n_identity_per_natural: int) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows = []
    natural_rv = rng.normal(0.7, 0.05, 6)
    # natural cells where R_V and the score move together strongly
    for i, rv in enumerate(natural_rv):
        nat = {"model": "m", "status": STATUS_OK, "is_natural": True, "control": NATURAL,
               "mode": MIX, "alpha": np.nan, "rv": rv, "score_keywords": 10 * rv + 0.01 * i}
        rows.append(nat)
        for k in range(n_identity_per_natural):  # alpha = 0 and self: natural's values
            rows.append({**nat, "is_natural": False, "control": PATCH if k % 2 else SELF,
                         "alpha": 0.0 if k % 2 else 0.5})
    # patched cells with no relation between R_V and the score
    for rv, score in zip(rng.normal(0.6, 0.05, 6), rng.normal(7.0, 0.5, 6), strict=True):
        rows.append({"model": "m", "status": STATUS_OK, "is_natural": False,
                     "control": PATCH, "mode": MIX, "alpha": 1.0, "rv": rv,
                     "score_keywords": score})
    return pd.DataFrame(rows)


def test_identity_cells_are_not_counted_again():
    clean = behaviour_correlations(_cells(0), ["rv", "score_keywords"])
    padded = behaviour_correlations(_cells(4), ["rv", "score_keywords"])
    a = clean.set_index("scope").loc["all"]
    b = padded.set_index("scope").loc["all"]
    assert a["n"] == b["n"] == 12  # 6 natural + 6 patched, whatever the copies
    assert b["pearson_r"] == a["pearson_r"] and b["pearson_p"] == a["pearson_p"]
    assert "24 identity cells" in b["note"] and "identity" not in a["note"]
    # counted as points, the copies would have changed the answer
    frame = _cells(4)
    naive = stats.pearsonr(frame["rv"], frame["score_keywords"])
    assert abs(naive.statistic - a["pearson_r"]) > 0.05 and naive.pvalue < a["pearson_p"]


def test_the_natural_scope_is_the_natural_cells():
    out = behaviour_correlations(_cells(4), ["rv", "score_keywords"])
    nat = out.set_index("scope").loc[NATURAL]
    assert nat["n"] == 6 and "identity" not in nat["note"]
