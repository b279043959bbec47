"""Every published number kn_utils compares against, in one place, each with its source.

Sources (REFERENCE.md): Niu, Liu, Zhu, Penn, ICLR 2024 ("the paper"); Dai et al., ACL 2022 ("Dai");
Meng et al., NeurIPS 2022 ("ROME").  Percentages are in % as printed; |KN|, τ, R²₁ as printed.
Nothing here is computed: the reproduction (:mod:`kn_utils.reproduce`) puts our numbers beside these.
Every constant names its source in :data:`CONSTANT_SOURCES` (table / figure, paper, and the section
of ``../shared/REFERENCE.md`` that quotes it); a number without a source there is not kept here.
Sample sizes are given only where the source gives them (Table 1's GPT-2 XL rows): ROME's CounterFact
numbers have none here, so reports must not print an n beside them.

:data:`REPORT_MINIMUM` holds the sizes a committed report must reach (issue 21); :func:`size_note`
words a section's size against it ("below the report minimum").
"""
from __future__ import annotations

from typing import NamedTuple

# Table 1 of the paper (ROME edits; teacher-forced token accuracy of the new answer, REFERENCE §4):
# relation -> (criterion, {model: (reliability, criterion, n)}).
PAPER_TABLE1 = {
    "P101": ("synonym", {"gpt2-xl": (99.82, 52.35, 568), "llama-2-7b": (100.0, 58.36, None)}),
    "P1376": ("symmetry", {"gpt2-xl": (96.37, 23.71, 234), "llama-2-7b": (100.0, 33.40, None)}),
    "P36": ("symmetry", {"gpt2-xl": (99.79, 25.17, 703), "llama-2-7b": (100.0, 33.64, None)}),
}
TABLE1_SOURCE = "Niu et al. 2024, Table 1 (ROME rows; the paper code's test_prediction_acc)"

# Table 8 of the paper: (model, BLiMP paradigm) -> (|KN| at tau = 0.7, final tau, R²₁).
PAPER_TABLE8 = {
    ("BERT", "determiner_noun_agreement_1"): (3.94, 0.71, 0.56),
    ("BERT", "determiner_noun_agreement_2"): (1.86, 0.62, 0.56),
    ("BERT", "determiner_noun_agreement_irregular_1"): (5.53, 0.73, 0.64),
    ("BERT", "determiner_noun_agreement_irregular_2"): (2.45, 0.67, 0.55),
    ("BERT", "determiner_noun_agreement_with_adjective_1"): (8.88, 0.78, 0.67),
    ("BERT", "determiner_noun_agreement_with_adj_2"): (2.26, 0.67, 0.57),
    ("BERT", "determiner_noun_agreement_with_adj_irregular_1"): (9.79, 0.78, 0.67),
    ("BERT", "determiner_noun_agreement_with_adj_irregular_2"): (2.60, 0.69, 0.58),
    ("GPT-2", "determiner_noun_agreement_1"): (0.06, 0.45, 0.15),
    ("GPT-2", "determiner_noun_agreement_irregular_1"): (1.32, 0.58, 0.24),
    ("GPT-2", "determiner_noun_agreement_with_adjective_1"): (1.31, 0.62, 0.17),
    ("GPT-2", "determiner_noun_agreement_with_adj_irregular_1"): (0.12, 0.51, 0.15),
}
TABLE8_SOURCE = "Niu et al. 2024, Table 8 (BLiMP determiner-noun agreement, |KN| / tau / R2_1)"

# Table 9 of the paper (ParaRel relations, BERT): the ranges over relations of tau and R²₁.
PAPER_TABLE9_RANGES = {"tau": (0.52, 0.96), "r2": (0.21, 0.87)}
TABLE9_SOURCE = "Niu et al. 2024, Table 9 (ParaRel, BERT): ranges over the relations"

# Fig 6b of the paper: BLiMP accuracy (%) before -> after the KN edit (BERT, type-2 paradigms).
PAPER_FIG6B = {
    "determiner_noun_agreement_2": (100.0, 94.8),
    "determiner_noun_agreement_irregular_2": (99.5, 96.9),
    "determiner_noun_agreement_with_adj_2": (97.1, 94.4),
    "determiner_noun_agreement_with_adj_irregular_2": (97.4, 95.4),
}
FIG6B_MAX_DROP = 5.2   # "edits shift probabilities a lot but flip <= 5.2 %"
FIG6B_SOURCE = "Niu et al. 2024, Fig 6b (BERT, KN edit)"

# Dai et al. 2022: mean relative change of the correct answer's probability, and KNs per fact.
DAI_SUPPRESS = -29.03   # %
DAI_ENHANCE = 31.17     # %
DAI_KN_PER_FACT = 4.13
DAI_SOURCE = "Dai et al. 2022, §4 (BERT-base, ParaRel): suppress / enhance knowledge neurons"

# ROME on CounterFact, GPT-2 XL (ROME Table 4): efficacy, paraphrase, neighbourhood success, score.
ROME_COUNTERFACT = {
    "rome": {"efficacy": 100.0, "paraphrase": 96.4, "neighborhood": 75.4, "score": 89.2},
    "kn": {"efficacy": 28.7, "paraphrase": 28.0, "neighborhood": 72.9, "score": 35.6},
}
COUNTERFACT_SOURCE = "Meng et al. 2022 (ROME), CounterFact results, GPT-2 XL (ROME and the KN baseline)"

# Causal tracing, ROME on GPT-2 XL over 1,000 known facts (%).
ROME_TRACING = {
    "clean": 27.0, "corrupted": 8.47, "total_effect": 18.6,
    "peak_hidden": 8.7, "peak_hidden_layer": 15, "n_layers": 48,
    "mlp_at_peak": 6.6, "attn_at_peak": 1.6,
}
TRACING_SOURCE = "Meng et al. 2022 (ROME), Fig 2 / §2.1, GPT-2 XL, 1,000 known facts"
# The paper: for agreement the early-MLP / late-attention split vanishes; MLP peaks at layers 30-35
# of GPT-2 XL's 48 (i.e. late, not at the last subject token's early site).
PAPER_AGREEMENT_MLP_PEAK = (30, 35, 48)
AGREEMENT_SOURCE = "Niu et al. 2024, §4 (causal tracing of determiner_noun_agreement_with_adj_1 and SVA)"

SOURCES = {
    "table1": TABLE1_SOURCE, "table8": TABLE8_SOURCE, "table9": TABLE9_SOURCE, "fig6b": FIG6B_SOURCE,
    "dai": DAI_SOURCE, "counterfact": COUNTERFACT_SOURCE, "tracing": TRACING_SOURCE,
    "agreement": AGREEMENT_SOURCE,
}

# Each published constant -> where it is printed (and where REFERENCE.md quotes it).
CONSTANT_SOURCES = {
    "PAPER_TABLE1": "Niu et al. 2024, Table 1 (ROME; GPT-2 XL with n, LLaMA-2-7B without) - REFERENCE.md §4",
    "PAPER_TABLE8": "Niu et al. 2024, Table 8 (BERT and GPT-2 rows) - REFERENCE.md §2",
    "PAPER_TABLE9_RANGES": "Niu et al. 2024, Table 9 (ParaRel, BERT; ranges over relations) - REFERENCE.md §2",
    "PAPER_FIG6B": "Niu et al. 2024, Fig 6b (BERT, type-2 DNA paradigms) - REFERENCE.md §2",
    "FIG6B_MAX_DROP": "Niu et al. 2024, Fig 6b text: edits flip <= 5.2 % - REFERENCE.md §2",
    "DAI_SUPPRESS": "Dai et al. 2022, §4 (BERT-base, ParaRel) - REFERENCE.md §1",
    "DAI_ENHANCE": "Dai et al. 2022, §4 (BERT-base, ParaRel) - REFERENCE.md §1",
    "DAI_KN_PER_FACT": "Dai et al. 2022, §4 (4.13 KNs per fact on average) - REFERENCE.md §1",
    "ROME_COUNTERFACT": "Meng et al. 2022 (ROME), CounterFact, GPT-2 XL, ROME and the KN baseline; no n "
                        "quoted - REFERENCE.md §4",
    "ROME_TRACING": "Meng et al. 2022 (ROME), causal tracing of 1,000 known facts, GPT-2 XL - REFERENCE.md §3",
    "PAPER_AGREEMENT_MLP_PEAK": "Niu et al. 2024, §4 (MLP peak layers 30-35 of GPT-2 XL's 48) - REFERENCE.md §3",
}


class Minimum(NamedTuple):
    n: int
    unit: str


# The sizes a committed report must reach (issue 21): below them the 95 % intervals are 30-90
# points wide and a reader cannot tell a finding from noise.  Section key -> (n, what n counts).
REPORT_MINIMUM = {
    "table1_rome": Minimum(100, "edits per relation (ROME)"),
    "table1_kn": Minimum(20, "edits per relation (KN editor)"),
    "counterfact": Minimum(50, "records per editor"),
    "table8": Minimum(20, "prompts per BLiMP bag"),
    "table9": Minimum(3, "facts on every relation with a decoder prompt"),
    "blimp": Minimum(200, "pairs per paradigm"),
    # Fig 6b scores the BLiMP pairs of its paradigms, so it needs as many as the BLiMP section
    "fig6b": Minimum(200, "pairs per paradigm"),
    "aie": Minimum(50, "known facts traced"),
}


def below_report_minimum(section: str, n) -> bool:
    """Whether ``n`` falls short of :data:`REPORT_MINIMUM` for ``section``."""
    if section not in REPORT_MINIMUM:
        raise ValueError(f"unknown report section {section!r}; known: {sorted(REPORT_MINIMUM)}")
    return n is None or n < REPORT_MINIMUM[section].n


def size_note(section: str, n) -> str:
    """"n = 12 of 50 records per editor (below the report minimum)" or "n = 60 (minimum 50 ...)"."""
    m = REPORT_MINIMUM.get(section)
    if m is None:
        raise ValueError(f"unknown report section {section!r}; known: {sorted(REPORT_MINIMUM)}")
    if below_report_minimum(section, n):
        return f"n = {n} of {m.n} {m.unit} (below the report minimum)"
    return f"n = {n} (minimum {m.n} {m.unit})"


__all__ = ["PAPER_TABLE1", "PAPER_TABLE8", "PAPER_TABLE9_RANGES", "PAPER_FIG6B", "FIG6B_MAX_DROP",
           "DAI_SUPPRESS", "DAI_ENHANCE", "DAI_KN_PER_FACT", "ROME_COUNTERFACT", "ROME_TRACING",
           "PAPER_AGREEMENT_MLP_PEAK", "SOURCES", "CONSTANT_SOURCES", "REPORT_MINIMUM", "Minimum",
           "below_report_minimum", "size_note"]
