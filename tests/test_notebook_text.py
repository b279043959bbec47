"""Issue 17 §8: the notebooks' conclusions are generated from the numbers they describe.  The
localise_kn conclusion cell runs here on synthetic tables: no significant Fig 11 shift must be said as
such, a significant one must name its verbs and their changes."""
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd

from kn_utils.plotting import attribution as plots

ROOT = Path(__file__).resolve().parents[1]
VERBS = {"plural": ["are", "were"], "singular": ["is", "was"]}


def _conclusion(p_values, changes, accuracy_after=(0.9, 0.8)):
    nb = nbformat.read(ROOT / "localise_kn.ipynb", as_version=4)
    [cell] = [c for c in nb.cells if c.cell_type == "code" and "def shift_sentence" in c.source]
    shown = []
    summary = pd.DataFrame({"token": ["are", "were", "is", "was"], "rel_change": changes, "p": p_values})
    env = {
        "pd": pd, "np": np, "time": time, "START": time.perf_counter(), "plots": plots, "VERBS": VERBS,
        "Markdown": lambda text: text, "display": shown.append,
        "localisation": pd.DataFrame({"tau": [0.7, 0.8], "R2": [0.2, 0.5], "|KN| (tau=0.7)": [3, 4]}),
        "facts": pd.DataFrame({"tau": [0.75], "R2": [0.9], "|KN| (tau=0.7)": [2]}),
        "syntax_neurons": [(28, 1)], "fact_neurons": [(29, 2)],
        "number_neurons": {"plural": (28, 1), "singular": (12, 3)},
        "summaries": {"plural": summary, "singular": summary},
        "accuracy": pd.DataFrame({"paradigm": ["dna_1", "sva_1"], "before": [1.0, 0.9],
                                  "after": list(accuracy_after)}),
    }
    exec(compile(cell.source, "localise_kn conclusion", "exec"), env)
    [text] = shown
    return text


def test_no_significant_shift_is_said_so():
    text = _conclusion([0.3, 0.5, 0.9, np.nan], [0.002, -0.003, 0.001, 0.0])
    assert "suppressing the plural neuron L28.N1: **no significant shift**" in text
    assert "largest relative change -0.003 for 'were'" in text
    assert "shifts probability mass" not in text
    assert "R2 ranges do not overlap" in text          # 0.2-0.5 vs 0.9-0.9
    assert "changes by -10.0 points on average over 2 paradigm(s) (largest: -10.0" in text


def test_a_significant_shift_names_its_verbs():
    text = _conclusion([0.01, 0.5, 0.02, 0.9], [-0.5, 0.1, 0.8, 0.0])
    assert "2 of 4 verbs shift significantly (p < 0.05): 1 plural verb(s) (are -0.5); 1 singular verb(s) (is +0.8)" in text
    assert "no significant shift" not in text
