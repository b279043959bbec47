"""One call per step of the notebooks' "Your prompt" sections: type a prompt, see what the model does.

Each function validates its input, returns a table (pandas DataFrame) or a small result object, and
draws its figure through :mod:`kn_utils.plotting` (shown inline in a notebook, saved when given
``save=``).  The notebooks stay thin: every step there is one of these calls.

    explore.top_tokens(lm, "The capital of France is")
    kns = explore.knowledge_neurons(lm, "The capital of France is", "Paris")   # + its paraphrases
    explore.intervention(lm, kns.prompts, "Paris", kns.chosen, others=["London", "Rome"])
    explore.rome_story(lm, "The capital of Canada is", "Canada", "Rome", reverse="Rome is the capital of")
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .attribution import attribution_maps, find_knowledge_neurons
from .editing.kn import intervention_summary, measure_intervention
from .plotting import attribution as plots
from .plotting import plot_probability_change, plot_trace_panels
from .scoring import predict, target_probability
from .resources import checkout_root, relative_paths
from .targets import prepare
from .tracing import causal_trace

__all__ = ["top_tokens", "attribution", "knowledge_neurons", "intervention", "trace", "trace_summary",
           "continuation", "rome_story", "rome_hparams", "PromptAttribution", "PromptKNs", "paraphrases",
           "known_examples", "your_prompt_folder", "layer_sweep_file", "shown_path", "GENERIC_FRAMES",
           "LAYER_SWEEPS"]

TRACE_KINDS = ("hidden", "mlp", "attn")


def _prompt(prompt, what="prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{what} must be a non-empty string, got {prompt!r}")
    return prompt


def _prompts(prompts, what="prompts") -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if prompts is not None else []
    if not prompts:
        raise ValueError(f"{what}: give at least one prompt")
    return [_prompt(p, f"each of {what}") for p in prompts]


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


# ------------------------------------------------------------------ examples, paraphrases, where things go
# Lead-ins for a prompt that matches no ParaRel pattern: each keeps the prompt's own words at the end,
# so the target stays its natural continuation; the KN search then has >= 5 prompts whose maps differ
# by their context (weaker than ParaRel's paraphrases, which also change the wording).
GENERIC_FRAMES = ("{}", "Fact: {}", "Here is a well-known fact. {}", "According to the encyclopedia, {}",
                  "Trivia question, answered: {}", "In short: {}")
# the ROME layer sweep (benchmarks/layer_sweep.py) each embedded model's edit layer was chosen by
LAYER_SWEEPS = {"default": "benchmarks/layer_sweep.csv", "gemma-3-270m": "benchmarks/layer_sweep_gemma_paper.csv"}


def _root() -> Path:
    return checkout_root() or Path.cwd()


def shown_path(text) -> str:
    """``text`` with every absolute path written relative to the checkout ("../shared/data"), so
    committed outputs show no path of the machine that made them."""
    return relative_paths(text, _root())


def _slug(text: str, size: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:size] or "prompt"


def your_prompt_folder(lm, prompt: str) -> Path:
    """``results/<model>/your_prompt/<prompt>/`` of the checkout (``$KN_RESULTS_DIR`` replaces
    ``results/``): where the "Your prompt" cells save their figures.  ``results/`` is git-ignored, so
    trying prompts never changes a tracked file, and each prompt (and model) keeps its own figures."""
    base = Path(os.environ.get("KN_RESULTS_DIR") or _root() / "results")
    # a model given as a folder is named by its path: its end names it best
    return base / _slug(lm.name, 400)[-40:].strip("-") / "your_prompt" / _slug(_prompt(prompt))


def layer_sweep_file(lm) -> Path | None:
    """This model's ROME layer-sweep CSV (:data:`LAYER_SWEEPS`), or None when it has none."""
    name = LAYER_SWEEPS.get(lm.name)
    return _root() / name if name and (_root() / name).is_file() else None


def known_examples(lm, n: int = 1, data_dir=None, candidates=None) -> pd.DataFrame:
    """The first ``n`` facts the loaded model knows: its top-1 next token is the fact's answer.

    ``candidates``: a DataFrame with prompt and attribute (or target) columns; default the built-in
    known facts, then the data folder's ROME known facts.  ``attrs["source"]`` says where they came
    from; raises if the model knows none of them."""
    from .data.counterfact import load_known_facts
    from .tracing import filter_known
    _positive_int("n", n)
    if candidates is None:
        pools = [load_known_facts(builtin=True)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pools.append(load_known_facts(data_dir).head(300))
    else:
        pools = [candidates]
    found, sources = [], []
    for pool in pools:
        known = filter_known(lm, pool, n=n - sum(map(len, found)))
        if len(known):
            found.append(known)
            sources.append(shown_path(pool.attrs.get("data_source", pool.attrs.get("source", "given"))))
        if sum(map(len, found)) >= n:
            break
    if not found:
        raise ValueError(f"{lm.name} gets none of the {sum(map(len, pools))} candidate facts right (top-1)")
    out = pd.concat(found, ignore_index=True).drop_duplicates("prompt").head(n).reset_index(drop=True)
    out.attrs["source"] = " + ".join(dict.fromkeys(sources))
    return out


def paraphrases(prompt: str, n: int = 5, data_dir=None, relation=None) -> list[str]:
    """``prompt`` and at least ``n - 1`` other prompts of the same fact (all ends with its answer).

    When the prompt is a ParaRel pattern of a relation ("Madrid is the capital of" = "[X] is the
    capital of"), the relation's other decoder patterns with the same subject; otherwise (or to reach
    ``n``) the prompt behind the lead-ins of :data:`GENERIC_FRAMES`.  ``.source`` of the returned
    list says which."""
    from .data import Loaded, pararel
    prompt, found, source = _prompt(prompt).strip(), [], "generic lead-ins (explore.GENERIC_FRAMES)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rels = [relation] if relation else pararel.relations(data_dir)
        for rel in rels:
            bags = pararel.load_bags(rel, data_dir, n=1)
            templates = list(dict.fromkeys(pararel.causal_templates(bags[0]))) if bags else []
            for t in templates:
                head, _, tail = t.partition("[X]")
                m = re.fullmatch(re.escape(head) + "(.+?)" + re.escape(tail), prompt)
                if m:
                    found = [x.replace("[X]", m.group(1)) for x in templates]
                    source = f"ParaRel {rel} patterns, subject {m.group(1)!r}"
                    break
            if found:
                break
    out = list(dict.fromkeys([prompt, *found]))
    if len(out) < n:
        out += [f.format(prompt) for f in GENERIC_FRAMES if f.format(prompt) not in out][:n - len(out)]
        if found:
            source += " + generic lead-ins"
    return Loaded(out, source)


def top_tokens(lm, prompt: str, k: int = 10) -> pd.DataFrame:
    """The ``k`` likeliest next tokens (masked LM: mask fillers): columns rank, token, probability."""
    _prompt(prompt)
    _positive_int("k", k)
    rows = predict(lm, prompt, top_k=min(k, len(lm.tokenizer)))
    return pd.DataFrame([(i + 1, t, p) for i, (t, p) in enumerate(rows)],
                        columns=["rank", "token", "probability"]).set_index("rank")


def _neuron_table(scores: torch.Tensor, top: int) -> pd.DataFrame:
    flat = scores.flatten()
    values, index = flat.topk(min(top, flat.numel()))
    n = scores.shape[1]
    return pd.DataFrame({"layer": (index // n).tolist(), "neuron": (index % n).tolist(),
                         "label": [plots.neuron_label((int(i) // n, int(i) % n)) for i in index],
                         "score": values.tolist()})


@dataclass
class PromptAttribution:
    """:func:`attribution`'s result: the map, its top neurons (a table) and the heatmap."""

    prompt: str
    target: str
    probability: float
    scores: torch.Tensor        # [n_layers, n_neurons]
    top: pd.DataFrame           # layer, neuron, label, score; best first
    figure: object = field(repr=False, default=None)

    @property
    def neurons(self) -> list[tuple[int, int]]:
        return list(zip(self.top.layer.astype(int), self.top.neuron.astype(int)))


def attribution(lm, prompt: str, target: str, *, steps: int = 20, top: int = 5, width: int = 4,
                save=None, folder=None) -> PromptAttribution:
    """Integrated-gradient attribution of every neuron to P(``target`` | ``prompt``).

    Draws the heatmap (all layers x the neurons around the ``top`` highest-scoring ones, boxed and
    labelled "L<layer>.N<neuron>") and returns the map and the top-neuron table.
    """
    _prompt(prompt)
    _prompt(target, "target")
    _positive_int("steps", steps)
    _positive_int("top", top)
    prepare(lm, prompt, target)  # one clear error for a target that tokenises to nothing
    scores = attribution_maps(lm, [prompt], [target], steps=steps, progress=False)[0]
    table = _neuron_table(scores, top)
    fig = plots.plot_attribution_heatmap(
        scores, list(zip(table.layer, table.neuron)), width=width, labels=True,
        title=f"attribution to {target.strip()!r} after {prompt!r}", save=save, folder=folder)
    return PromptAttribution(prompt, target, target_probability(lm, prompt, target), scores, table, fig)


@dataclass
class PromptKNs:
    """:func:`knowledge_neurons`'s result: the KN search over your paraphrases and a table of its
    neurons (how many prompts had each as a coarse neuron, its mean attribution).

    ``neurons``: the knowledge neurons (the τ rule met).  When no τ gives the wanted count,
    ``closest`` holds the nearest set the search saw and ``relaxed`` says which rule was relaxed to
    get it; those are candidates, not KNs (the table's ``status`` column and the figure say so)."""

    prompts: list[str]
    target: str
    result: object              # kn_utils.attribution.KNResult
    table: pd.DataFrame
    figure: object = field(repr=False, default=None)
    closest: list = field(default_factory=list)
    relaxed: str = ""

    @property
    def neurons(self) -> list[tuple[int, int]]:
        # a search that ended outside min..max (tau left [0, 1], too many steps) still returns a set
        return list(self.result.neurons) if self.result.converged else []

    @property
    def chosen(self) -> list[tuple[int, int]]:
        """The KNs, else the closest (relaxed) set: the neurons to intervene on."""
        return self.neurons or list(self.closest)


def _closest_set(res, mean, min_n: int, max_n: int):
    """The τ-history entry nearest the wanted count, cut to the ``max_n`` best by mean attribution."""
    n = res.n_prompts
    gap = lambda k: (min_n - k) if k < min_n else max(0, k - max_n)  # noqa: E731
    tau, count = min((h for h in res.history if h[1] > 0), key=lambda h: (gap(h[1]), -h[0]), default=(None, 0))
    if tau is None:
        return [], (f"no neuron is coarse in more than {min(t for t, _ in res.history):.2f} of the "
                    f"{n} prompts: nothing to show")
    pool = sorted((nrn for nrn, c in res.counts.items() if c > tau * n), key=lambda x: -float(mean[x]))
    if len(pool) > max_n:
        return pool[:max_n], (f"rule relaxed: the count ({min_n}-{max_n}); these are the {max_n} of the "
                              f"{len(pool)} neurons coarse in > {tau:.2f} of the {n} prompts with the "
                              f"highest mean attribution")
    return pool, (f"rule relaxed: the minimum count ({min_n}); {len(pool)} neuron(s) coarse in > "
                  f"{tau:.2f} of the {n} prompts")


def knowledge_neurons(lm, prompts, target: str, *, steps: int = 20, width: int = 4, save=None,
                      folder=None, n_paraphrases: int = 5, data_dir=None, **kn_kwargs) -> PromptKNs:
    """Dai et al.'s knowledge neurons of a few paraphrases of one fact (or one pattern).

    ``prompts``: two or more prompts that all continue with ``target``, or one prompt, whose
    ``n_paraphrases`` paraphrases :func:`paraphrases` writes.  ``kn_kwargs`` go to
    :func:`kn_utils.find_knowledge_neurons` (threshold, tau, min_neurons, max_neurons, ...).  When no
    τ gives min..max neurons, the closest set is shown and the rule relaxed for it is named (see
    :class:`PromptKNs`).  Draws the mean attribution map around the KNs, else the closest set
    (labelled "candidate"), else around its maximum (labelled "max attribution").
    """
    prompts = _prompts(paraphrases(prompts, n_paraphrases, data_dir) if isinstance(prompts, str) else prompts)
    if len(prompts) < 2:
        raise ValueError(f"knowledge neurons need at least 2 paraphrases, got {len(prompts)}: {prompts!r}")
    _prompt(target, "target"), _positive_int("steps", steps)
    maps = attribution_maps(lm, prompts, [target] * len(prompts), steps=steps, progress=False)
    res = find_knowledge_neurons(lm, prompts, target, maps=maps, progress=False, **kn_kwargs)
    mean = maps.mean(0)
    kn, closest, relaxed = (list(res.neurons) if res.converged else []), [], ""
    if not kn:
        closest, relaxed = _closest_set(res, mean, kn_kwargs.get("min_neurons", 2), kn_kwargs.get("max_neurons", 5))
        relaxed = f"{res.message}. {relaxed}"
    shown = kn or closest
    table = pd.DataFrame({
        "layer": [n[0] for n in shown], "neuron": [n[1] for n in shown],
        "label": [plots.neuron_label(n) for n in shown],
        "status": ["KN" if kn else "closest set (relaxed, not a KN)"] * len(shown),
        "coarse in prompts": [res.counts.get(tuple(n), 0) for n in shown],
        "mean score": [float(mean[n]) for n in shown]})
    table.attrs.update(tau=res.tau, r2=res.r2, message=res.message, relaxed=relaxed)
    if kn:
        what = f"KNs at tau={res.tau:.2f}: " + ", ".join(plots.neuron_label(n) for n in kn)
    elif closest:
        what = "no tau gives a KN set; boxed: the closest set (not KNs)"
    else:
        what = "no knowledge neurons; boxed: the maximum"
    fig = plots.plot_attribution_heatmap(
        maps, shown or None, width=width, labels=True, label_prefix="" if kn else "candidate ",
        save=save, folder=folder, title=f"mean attribution over {len(prompts)} prompts; {what}")
    return PromptKNs(list(prompts), target, res, table, fig, closest, relaxed)


def intervention(lm, prompts, target: str, neurons, *, others=(), factor: float = 2.0, save=None,
                 folder=None) -> pd.DataFrame:
    """Suppress (set to 0) and enhance (x ``factor``) ``neurons`` at the read position: the mean
    probability of ``target`` and of each word in ``others`` (its first token, as the next token /
    mask filler) over ``prompts``, before, suppressed and enhanced.

    Draws one bar chart per intervention (relative change, red labels where a t-test over the
    prompts gives p < 0.05; ``save`` gets ``_suppress`` / ``_enhance`` appended).
    Returns one row per word: word, role, p before, p suppressed, p enhanced, and the two relative
    changes (p_post - p_pre) / min(p_post, p_pre).
    """
    prompts, _ = _prompts(prompts), _prompt(target, "target")
    others = [others] if isinstance(others, str) else others
    words = list(dict.fromkeys([target, *others]))
    [_prompt(w, "each of others") for w in words]
    neurons = [(int(a), int(b)) for a, b in neurons]
    if not neurons:
        raise ValueError("no neurons to intervene on: pass a non-empty list of (layer, neuron) pairs")
    summaries = {}
    for mode in ("suppress", "enhance"):
        summaries[mode] = intervention_summary(
            measure_intervention(lm, prompts, words, neurons, mode=mode, factor=factor))
        plot_probability_change(
            summaries[mode], {"target": [target], "other words": list(others)},
            title=f"{mode} {', '.join(plots.neuron_label(n) for n in neurons)}"
                  + (f" (x{factor:g})" if mode == "enhance" else " (set to 0)"),
            save=f"{save}_{mode}" if save else None, folder=folder)
    sup, enh = (summaries[m].set_index("token") for m in ("suppress", "enhance"))
    return pd.DataFrame({
        "word": words, "role": ["target" if w == target else "other" for w in words],
        "p before": [sup.loc[w, "pre_mean"] for w in words],
        "p suppressed": [sup.loc[w, "post_mean"] for w in words],
        "p enhanced": [enh.loc[w, "post_mean"] for w in words],
        "change suppressed": [sup.loc[w, "rel_change"] for w in words],
        "change enhanced": [enh.loc[w, "rel_change"] for w in words]})


def trace_summary(traces) -> pd.DataFrame:
    """One row per trace: answer, clean and corrupted probability, and where restoring helps most."""
    rows = []
    for kind, tr in (traces.items() if isinstance(traces, dict) else ((t.kind, t) for t in traces)):
        t, layer = divmod(int(tr.scores.argmax()), tr.scores.shape[1])
        rows.append({"kind": kind, "answer": tr.answer, "clean p": tr.high_score, "corrupted p": tr.low_score,
                     "peak p": float(tr.scores[t, layer]), "peak token": f"{t} {tr.tokens[t]!r}",
                     "peak layer": layer})
    return pd.DataFrame(rows).set_index("kind")


def trace(lm, prompt: str, subject: str, *, samples: int = 10, noise="s3", target=None, window: int = 10,
          kinds=TRACE_KINDS, save=None, folder=None, progress: bool = False) -> dict:
    """Causal traces of ``prompt`` with ``subject`` corrupted: hidden state, MLP and attention panels
    (Fig 7), drawn side by side.  Returns {kind: TraceResult}; :func:`trace_summary` tabulates it."""
    if _prompt(subject, "subject") not in _prompt(prompt):
        raise ValueError(f"subject {subject!r} is not in the prompt {prompt!r}")
    _positive_int("samples", samples)
    kinds = list(kinds)
    if not kinds or set(kinds) - set(TRACE_KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {TRACE_KINDS}, got {kinds!r}")
    traces = {k: causal_trace(lm, prompt, subject, kind=k, samples=samples, noise=noise, target=target,
                              window=window, progress=progress) for k in kinds}
    plot_trace_panels(traces, save=save, folder=folder, model_name=lm.name)
    return traces


def continuation(lm, prompt: str, tokens: int = 12, *, sample: bool = False, seed: int = 0) -> str:
    """The model's continuation of ``prompt``: greedy, or sampled (top-5, seeded) with ``sample``."""
    _prompt(prompt)
    _positive_int("tokens", tokens)
    if lm.arch.is_masked_lm:
        raise ValueError(f"{lm.name} is a masked LM: it fills masks (top_tokens) but does not continue text")
    ids = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = lm.model.generate(**ids, max_new_tokens=tokens, do_sample=sample, top_k=5 if sample else None,
                                pad_token_id=lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id)
    return lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def rome_hparams(lm, data_dir=None, config: str = "paper"):
    """ROME's settings for ``lm`` (``ROMEHyperParams.for_model(lm, config)``), runnable here.

    ``config="paper"`` (the paper's code) runs without covariance statistics.  ``"rome"`` needs a text
    corpus for them: the data folder's WikiText / Wikipedia sample, else WikiText-103 from the hub
    through the ``datasets`` package.  With neither (a fresh machine without the data sets), the
    covariance adjustment is switched off (C = identity) and a warning says so, rather than failing.
    """
    from .data.text import resolve_corpus
    from .editing.rome import ROMEHyperParams

    hp = ROMEHyperParams.for_model(lm, config)
    corpus = resolve_corpus(hp.mom2_dataset, data_dir)
    if hp.mom2_adjustment and corpus.startswith("hub:") and importlib.util.find_spec("datasets") is None:
        warnings.warn(f"no local text corpus for ROME's covariance statistics (no data folder) and no `datasets` "
                      f"package to fetch {corpus[4:]!r}: ROME runs without the covariance adjustment (C = "
                      f"identity); give DATA_DIR a folder with wikitext/ for the paper's setting", stacklevel=2)
        hp = dataclasses.replace(hp, mom2_adjustment=False)
    return hp


def rome_story(lm, prompt: str, subject: str, new_answer: str, *, reverse=None, others=(), top_k: int = 3,
               tokens: int = 12, data_dir=None, hparams=None) -> pd.DataFrame:
    """A ROME edit told in three stages: before, after ``prompt`` -> ``new_answer`` and restored.

    For the prompt, the ``reverse`` (symmetric) question, e.g. "Rome is the capital of", and ``others``,
    each stage gives the top-``top_k`` next tokens, the probability of the answer the probe asks for
    (``answer`` / ``p(answer)``: the new answer for the prompt and ``others``, the subject for the
    reverse question: does "Rome is the capital of" now continue with "Canada"?) and the greedy
    continuation.  The edit
    is always undone (also on error); ``hparams`` default to :func:`rome_hparams`; the "restored" rows come from the restored weights, and
    ``df.attrs["restored_exactly"]`` says whether every weight is bit-for-bit the original.
    """
    from .editing.rome import rome_edit

    for name, text in (("prompt", prompt), ("subject", subject), ("new_answer", new_answer)):
        _prompt(text, name)
    if subject not in prompt:
        raise ValueError(f"subject {subject!r} is not in the prompt {prompt!r}")
    probes = [("edited prompt", prompt, new_answer)]
    if reverse:
        probes.append(("reverse question", _prompt(reverse, "reverse"), subject))
    probes += [("other", _prompt(p, "each of others"), new_answer)
               for p in ([others] if isinstance(others, str) else others)]

    def stage(name):
        return [{"stage": name, "probe": role, "prompt": p,
                 "top": ", ".join(f"{t!r} {q:.2f}" for t, q in predict(lm, p, top_k)),
                 "answer": a.strip(), "p(answer)": target_probability(lm, p, a),
                 "continuation": continuation(lm, p, tokens)} for role, p, a in probes]

    hparams = hparams or rome_hparams(lm, data_dir)
    rows = stage("before")
    edit = rome_edit(lm, prompt, subject, new_answer, hparams, data_dir=data_dir)
    try:
        # the edit's copies of what it changed (not a copy of the whole model)
        originals = edit.originals()
        rows += stage("after edit")
    finally:
        edit.restore()
    rows += stage("restored")
    df = pd.DataFrame(rows)
    df.attrs["restored_exactly"] = bool(originals) and all(torch.equal(p, o) for p, o in originals)
    df.attrs["edit"] = getattr(edit, "description", "")
    df.attrs["delta_norm"] = getattr(edit, "delta_norm", float("nan"))
    return df
