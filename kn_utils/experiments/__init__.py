"""The paper's experiments as units over a result store (:mod:`kn_utils.store`).

:data:`UNITS` maps each unit's name to its module, in the report's order; the CLI
(``python -m kn_utils reproduce``), the Makefile and the notebooks read it.

Writing a unit
--------------
A unit is a module of this package with these names:

``NAME``, ``TITLE``
    the section key (CSV prefix, ``--sections`` name) and its heading in REPORT.md.
``VERSION``
    an int; bump it whenever what an item computes changes: old records then no longer match and
    the items are computed again.
``RESULT_SIZES``
    the sizes of :data:`SCALES` that change an item's result (part of the record key); sizes that
    only say how many items there are do not belong here.
``MINIMUM``
    the report minimum as {size name: least value}; a run with a smaller size, or with fewer items
    done than the plan's ``n_minimum``, is marked "below the report minimum".
``settings(ctx) -> dict`` (optional)
    further settings in the record key (hyperparameters, configuration).
``plan(ctx) -> {"items": [...], "source": str, "n_minimum": int, "info": {...}}``
    the items at the context's sizes, each a dict with a stable ``"id"`` derived from the data (not
    from a list position that depends on the model) plus whatever ``compute`` needs (in memory
    only); ``info`` is kept in ``plan.json`` for ``summarise`` (JSON-able).  May raise
    :class:`SectionSkipped` with the reason.
``compute(ctx, item) -> dict``
    one item through the public API; a JSON-able result (numbers for the tables and figures, no
    big arrays).  ``{"_skipped": why, ...}`` records an item that cannot be computed.
``compute_batch(ctx, items) -> [dict, ...]`` and ``BATCH`` (an int or ``BATCH(ctx) -> int``; optional)
    the results of several items at once, one per item in their order, each what ``compute``
    gives for it (up to float rounding): for items that share work (Table 1's ROME items: their
    v* in one batch).  The runner then hands it ``BATCH`` of its missing items at a time (after
    ``--shard`` striding; ``--time-budget`` starts no batch once spent) and writes one record per
    item, with ``seconds`` = the batch's time / its size and ``batch`` = the size.
``summarise(records, plan, sec, out)``
    the records (plan order) -> ``sec.tables`` (CSV names ``<NAME>_<table>.csv``; item tables
    carry ``worker`` and ``seconds``), ``sec.text`` (generated from the numbers), ``sec.sizes``,
    ``sec.figures`` (PNGs written into ``out`` through :func:`common.figure` / ``bar_figure``).
    No model: it runs under ``--render-only``.
``DERIVED`` (optional)
    a unit with no items of its own, rendered from the records of these units (e.g. ``syntax``
    from Table 8 and Table 9); the report renders it whenever they have records, through
    ``derived_plan(plans)`` when the unit's own plan is missing.
``headline(sec) -> [(result, ours, ci_lo, ci_hi, n, paper, paper_setting), ...]``
    the unit's rows of ``headline.csv``.

:class:`common.Context` holds the model, the sizes and the knowledge-neuron searches shared by
units in one process (Dai / Table 9 and Fig 6b / Table 8 reuse each other's).
"""
from __future__ import annotations

from . import blimp, counterfact, dai, fig6b, syntax, table1, table8, table9, tracing
from .common import SCALES, Context, Section, SectionSkipped

UNITS = {u.NAME: u for u in (table1, counterfact, dai, fig6b, table9, blimp, table8, syntax, tracing)}
SECTIONS = tuple(UNITS)
TITLES = {name: u.TITLE for name, u in UNITS.items()}

__all__ = ["UNITS", "SECTIONS", "TITLES", "SCALES", "Context", "Section", "SectionSkipped"]
