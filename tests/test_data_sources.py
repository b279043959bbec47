"""Where data comes from: empty settings, missing folders, built-in fallbacks and their warning,
and the ``data_source`` every loaded set and result table carries."""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import kn_utils.data as kd
from kn_utils import settings
from kn_utils.data import BuiltinDataWarning, blimp, pararel, source_of
from kn_utils.data.counterfact import BUILTIN_KNOWN, load_counterfact, load_known_facts
from kn_utils.data.text import load_texts

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_P36 = len(json.loads(pararel.BUILTIN_BAGS.read_text())["P36"])
BUILTIN_FACTS = len(json.loads(BUILTIN_KNOWN.read_text()))


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """A machine with no data sets: KN_DATA_DIR unset and nothing beside the checkout."""
    monkeypatch.delenv("KN_DATA_DIR", raising=False)
    monkeypatch.delenv("KN_SHARED_DATA", raising=False)
    monkeypatch.setattr(kd, "SHARED_DATA_DIR", tmp_path / "no-shared-data")
    monkeypatch.setattr(blimp, "_from_hub", lambda uid: (_ for _ in ()).throw(ValueError("no hub")))


def _only_warning(record, *needles):
    found = [w for w in record if issubclass(w.category, BuiltinDataWarning)]
    assert len(found) == 1, [str(w.message) for w in record]
    text = str(found[0].message)
    for needle in needles:
        assert needle in text, text
    return text


# ---------------------------------------------------------------------------- the settings rule
@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_blank_environment_value_is_not_set(monkeypatch, value):
    monkeypatch.setenv("KN_SOME_SETTING", value)
    assert settings.env("KN_SOME_SETTING") is None
    assert settings.env("KN_SOME_SETTING", "fallback") == "fallback"
    assert settings.env_flag("KN_SOME_SETTING", True) is True
    assert not settings.given(value)


def test_environment_values_and_flags(monkeypatch):
    monkeypatch.setenv("KN_SOME_SETTING", "  /some/folder ")
    assert settings.env("KN_SOME_SETTING") == "/some/folder"
    monkeypatch.delenv("KN_SOME_SETTING")
    assert settings.env("KN_SOME_SETTING", "d") == "d"
    for value, expected in (("1", True), ("Yes", True), ("off", False), ("FALSE", False)):
        monkeypatch.setenv("KN_FLAG", value)
        assert settings.env_flag("KN_FLAG") is expected
    monkeypatch.setenv("KN_FLAG", "maybe")
    with pytest.raises(ValueError, match="KN_FLAG='maybe'.*unset KN_FLAG"):
        settings.env_flag("KN_FLAG")
    assert settings.given("x") and settings.given(Path("x")) and settings.given(0)
    assert not settings.given(None)


# ---------------------------------------------------------------------------- data_root
def test_data_root_empty_values_mean_not_given(no_data, monkeypatch, tmp_path):
    monkeypatch.setenv("KN_DATA_DIR", "")
    assert kd.data_root() is None
    assert kd.data_root("") is None and kd.data_root("  ") is None
    # an empty KN_DATA_DIR does not stop the search: the folder beside the checkout is still found
    shared = tmp_path / "shared-data"
    shared.mkdir()
    monkeypatch.setattr(kd, "SHARED_DATA_DIR", shared)
    assert kd.data_root("") == shared
    monkeypatch.setenv("KN_SHARED_DATA", "0")  # ... unless that look is switched off
    assert kd.data_root() is None
    monkeypatch.setenv("KN_SHARED_DATA", "sometimes")
    with pytest.raises(ValueError, match="KN_SHARED_DATA"):
        kd.data_root()


def test_data_root_order(no_data, monkeypatch, tmp_path):
    arg, env_dir, shared = (tmp_path / n for n in ("arg", "env", "shared"))
    for d in (arg, env_dir, shared):
        d.mkdir()
    monkeypatch.setattr(kd, "SHARED_DATA_DIR", shared)
    assert kd.data_root() == shared
    monkeypatch.setenv("KN_DATA_DIR", str(env_dir))
    assert kd.data_root() == env_dir
    assert kd.data_root(str(arg)) == arg and kd.data_root(arg) == arg


def test_missing_folders_raise_naming_them(no_data, monkeypatch, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"data_dir='{missing}' is not a folder"):
        kd.data_root(missing)
    monkeypatch.setenv("KN_DATA_DIR", str(missing))
    for load in (kd.data_root, lambda: pararel.load_bags("P36"), load_known_facts, load_counterfact,
                 lambda: blimp.load_paradigm("sva_1"), lambda: load_texts("wikitext")):
        with pytest.raises(FileNotFoundError, match=f"KN_DATA_DIR='{missing}'.*unset KN_DATA_DIR"):
            load()


# ---------------------------------------------------------------------------- fallbacks say so
@pytest.mark.parametrize("how", ["env-empty", "arg-empty", "env-empty-folder"])
def test_fallbacks_warn_once_and_record_the_source(no_data, monkeypatch, tmp_path, how):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("KN_DATA_DIR", str(empty) if how == "env-empty-folder" else "")
    arg = "" if how == "arg-empty" else None

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bags = pararel.load_bags("P36", arg, n=3)
    _only_warning(record, "ParaRel P36", f"builtin:pararel_mini.json ({BUILTIN_P36} items)",
                  "not the data set's")
    assert len(bags) == 3 and source_of(bags) == f"builtin:pararel_mini.json ({BUILTIN_P36} items)"
    assert kd.is_builtin(bags)

    # the fault of the issue: ct_rome passed KN_DATA_DIR="" on, and load_known_facts("") raised
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        facts = load_known_facts(arg, n=2)
    why = f"no known_1000.json under {empty / 'counterfact'}" if how == "env-empty-folder" \
        else "no data directory"
    _only_warning(record, "known facts", why, f"builtin:known_facts.json ({BUILTIN_FACTS} items)")
    assert len(facts) == 2 and facts.attrs["data_source"] == f"builtin:known_facts.json ({BUILTIN_FACTS} items)"

    uid = "regular_plural_subject_verb_agreement_1"
    n_builtin = sum(1 for r in blimp._builtin_table() if r["UID"] == uid)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rows = blimp.load_paradigm(uid, arg, n=4)
    _only_warning(record, f"BLiMP {uid}", f"builtin:blimp_mini.jsonl ({n_builtin} items)")
    assert len(rows) == 4 and rows.source == f"builtin:blimp_mini.jsonl ({n_builtin} items)"

    with pytest.raises(FileNotFoundError, match="counterfact"):  # no built-in CounterFact
        load_counterfact(arg)


def test_asked_for_builtin_sets_do_not_warn(no_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BuiltinDataWarning)
        facts = load_known_facts(builtin=True)
        rows = blimp.load_paradigm("sva_1", source="builtin")
    assert facts.attrs["data_source"] == f"builtin:known_facts.json ({BUILTIN_FACTS} items)"
    assert rows.source.startswith("builtin:blimp_mini.jsonl")


def test_given_folder_without_known_facts_is_an_error(no_data, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"known_1000.json not found under {tmp_path / 'counterfact'}"):
        load_known_facts(tmp_path)


def test_real_data_sources_name_the_files(data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BuiltinDataWarning)
        bags = pararel.load_bags("P36", data_dir, n=2)
        facts = load_known_facts(data_dir, n=2)
        rows = blimp.load_paradigm("dna_1", data_dir, n=3)
        cf = load_counterfact(data_dir, n=2)
    bag_file = data_dir / "pararel" / "data_all_allbags.json"
    n_p36 = len(json.loads(bag_file.read_text())["P36"])
    assert source_of(bags) == f"{bag_file} ({n_p36} items)" and not kd.is_builtin(bags)
    known = data_dir / "counterfact" / "known_1000.json"
    assert facts.attrs["data_source"] == f"{known} ({len(json.loads(known.read_text()))} items)"
    blimp_file = data_dir / "blimp" / "determiner_noun_agreement_1.jsonl"
    n_lines = sum(1 for line in blimp_file.read_text().splitlines() if line.strip())
    assert rows.source == f"{blimp_file} ({n_lines} items)"
    assert cf.attrs["data_source"].startswith(str(data_dir / "counterfact" / "easyedit-split"))


# ---------------------------------------------------------------------------- results carry it
class _NoEdit:
    def restore(self):
        pass


def test_evaluate_edits_and_summary_record_the_source(tiny, no_data):
    from kn_utils.evaluation import evaluate_edits, summarize_edits
    with pytest.warns(BuiltinDataWarning, match="ParaRel P36"):
        df = evaluate_edits(tiny("llama"), editor=lambda lm, req: _NoEdit(), relation="P36", n=2,
                            data_dir="", progress=False)
    assert len(df) == 2
    assert df.attrs["data_source"] == f"builtin:pararel_mini.json ({BUILTIN_P36} items)"
    table = summarize_edits(df, print_table=False)
    assert set(table["data_source"]) == {df.attrs["data_source"]}


def test_localise_tables_record_the_source(tiny, no_data):
    from kn_utils.commands.localise import localise_paradigm
    with pytest.warns(BuiltinDataWarning, match="BLiMP"):
        summary, groups, prompts, _ = localise_paradigm(
            tiny("llama"), "sva_1", n=2, eval_n=4, steps=2, data_dir="")
    assert summary["data_source"].startswith("builtin:blimp_mini.jsonl (")
    assert groups.attrs["data_source"] == prompts.attrs["data_source"] == summary["data_source"]


def test_blimp_tables_record_the_source(tiny, no_data):
    with pytest.warns(BuiltinDataWarning):
        pairs = blimp.minimal_pairs(tiny("llama"), "sva_1", n=5)
    with pytest.warns(BuiltinDataWarning):
        rows = blimp.load_paradigm("sva_1")
    assert pairs.attrs["data_source"] == rows.source
    from kn_utils.blimp_tasks import pair_scores
    assert pair_scores(tiny("llama"), pairs).attrs["data_source"] == rows.source


# ---------------------------------------------------------------------------- Makefile and demo
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_exports_kn_data_dir_only_for_a_folder(tmp_path):
    checkout = tmp_path / "clone"
    checkout.mkdir()
    text = (ROOT / "Makefile").read_text()
    (checkout / "Makefile").write_text(text + '\nshow-data:\n\t@echo "[$${KN_DATA_DIR-unset}]"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("KN_DATA_DIR", "MAKEFLAGS", "MFLAGS")}

    def show(**extra):
        out = subprocess.run(["make", "-s", "show-data"], cwd=checkout, env={**env, **extra},
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    assert show() == "[unset]"                    # a fresh clone: no ../shared/data beside it
    assert show(KN_DATA_DIR="") == "[unset]"
    assert show(KN_DATA_DIR="/x/y") == "[/x/y]"  # the user's own setting goes through
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert show() == f"[{tmp_path / 'shared' / 'data'}]"


def _demo_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("KN_DATA_DIR", "KN_SHARED_DATA")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", KN_SHARED_DATA="0", **extra)
    return env


@pytest.mark.slow  # python -m kn_utils demo in a subprocess
def test_demo_stops_early_on_a_missing_data_folder(tmp_path):
    missing = tmp_path / "nowhere"
    out = subprocess.run([sys.executable, "-m", "kn_utils", "demo"], cwd=tmp_path, capture_output=True,
                         text=True, env=_demo_env(KN_DATA_DIR=str(missing)), timeout=300)
    assert out.returncode != 0
    assert f"KN_DATA_DIR='{missing}'" in out.stderr and "unset KN_DATA_DIR" in out.stderr
    assert "Top-5" not in out.stdout  # before the model was loaded


@pytest.mark.slow
@pytest.mark.parametrize("kn_data_dir", [None, ""])
def test_demo_runs_with_no_data_folder(tmp_path, kn_data_dir):
    extra = {} if kn_data_dir is None else {"KN_DATA_DIR": kn_data_dir}
    out = subprocess.run([sys.executable, "-m", "kn_utils", "demo"], cwd=tmp_path, capture_output=True,
                         text=True, env=_demo_env(**extra), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data sets: none found" in out.stdout
    assert f"known facts from builtin:known_facts.json ({BUILTIN_FACTS} items)" in out.stdout
    assert out.stderr.count("BuiltinDataWarning") == 1


def test_traced_facts_keep_their_source(tiny, no_data):
    from kn_utils.tracing import average_indirect_effect, filter_known
    with pytest.warns(BuiltinDataWarning, match="known facts"):
        facts = load_known_facts(n=2)
    lm = tiny("gpt2")
    assert filter_known(lm, facts).attrs["data_source"] == facts.attrs["data_source"]
    aie = average_indirect_effect(lm, facts, samples=2, noise=0.1, only_correct=False, progress=False)
    assert aie.attrs["data_source"] == f"builtin:known_facts.json ({BUILTIN_FACTS} items)"
    assert "data_source" not in average_indirect_effect(
        lm, [(facts.prompt[0], facts.subject[0])], samples=2, noise=0.1, progress=False).attrs


def test_command_outputs_carry_the_source(tmp_path, no_data, monkeypatch):
    import pandas as pd
    from tiny_models import save_tiny

    from kn_utils.cli import main
    model = save_tiny("llama", tmp_path / "model")  # before the cache moves: it reads the tokenizer there
    monkeypatch.setenv("KN_UTILS_CACHE", str(tmp_path / "cache"))  # ROME writes nothing to the real one
    monkeypatch.setenv("KN_DATA_DIR", "")
    out = tmp_path / "out"
    with pytest.warns(BuiltinDataWarning):
        assert main(["localise", "--model", model, "--device", "cpu", "--paradigm", "sva_1", "--n", "2",
                     "--eval-n", "4", "--steps", "2", "--no-figures", "--out", str(out),
                     "--data-dir", ""]) == 0
    uid = "regular_plural_subject_verb_agreement_1"
    summary = json.loads((out / f"localise_{uid}.json").read_text())
    assert summary["data_source"].startswith("builtin:blimp_mini.jsonl (")
    for table in ("groups", "prompts"):
        frame = pd.read_csv(out / f"localise_{uid}_{table}.csv")
        assert set(frame["data_source"]) == {summary["data_source"]}
    with pytest.warns(BuiltinDataWarning):
        assert main(["evaluate-edits", "--model", model, "--device", "cpu", "--relation", "P36", "--n", "2",
                     "--steps", "2", "--layer", "1", "--no-mom2", "--out", str(out)]) == 0
    expected = f"builtin:pararel_mini.json ({BUILTIN_P36} items)"
    assert set(pd.read_csv(out / "edits_rome_P36.csv")["data_source"]) == {expected}
    assert set(pd.read_csv(out / "edits_rome_summary.csv")["data_source"]) == {expected}


# ---------------------------------------------------------------------------- damaged or changed files
def _bags_folder(tmp_path) -> Path:
    folder = tmp_path / "data" / "pararel"
    folder.mkdir(parents=True)
    shutil.copy(pararel.BUILTIN_BAGS, folder / "data_all_allbags.json")
    return tmp_path / "data"


def test_a_truncated_bag_file_names_the_file(tmp_path):
    data = _bags_folder(tmp_path)
    path = data / "pararel" / "data_all_allbags.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    # before: a bare JSONDecodeError ("Expecting ',' delimiter: line 1 column ...") without the file
    with pytest.raises(ValueError, match=re.escape(f"{path}, line ") + r"\d+: not valid JSON"):
        pararel.load_bags("P36", data)


def test_a_changed_bag_file_is_read_again(tmp_path):
    data = _bags_folder(tmp_path)
    path = data / "pararel" / "data_all_allbags.json"
    first = pararel.load_bags("P36", data)
    table = json.loads(path.read_text())
    table["P36"] = table["P36"][:-1]
    path.write_text(json.dumps(table))
    again = pararel.load_bags("P36", data)         # before: the old contents (cached by path)
    assert len(again) == len(first) - 1 and list(again) == list(first)[:-1]
    assert again.source == f"{path} ({len(first) - 1} items)"


@pytest.mark.parametrize("entry, message", [
    (["The capital of X is [MASK] .", None, "P36(capital)"], "bag 1, entry 0: expected"),
    (["The capital of X is .", "Y", "P36(capital)"], "bag 1, entry 0: the prompt must hold one [MASK]"),
])
def test_a_damaged_bag_names_relation_bag_and_entry(tmp_path, entry, message):
    data = _bags_folder(tmp_path)
    path = data / "pararel" / "data_all_allbags.json"
    table = json.loads(path.read_text())
    table["P36"][1][0] = entry
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=re.escape(f"{path}: relation 'P36', {message}")):
        pararel.load_bags("P36", data)


BLIMP_UID = "regular_plural_subject_verb_agreement_1"


@pytest.mark.parametrize("damage, field", [
    (lambda r: r.pop("sentence_bad"), "field 'sentence_bad' is missing"),
    (lambda r: r.update(sentence_good=None), "field 'sentence_good' is null"),
    (lambda r: r.update(one_prefix_method=True, one_prefix_word_bad=""), "field 'one_prefix_word_bad' is empty"),
])
def test_a_blimp_row_without_its_sentences_names_file_and_line(tmp_path, damage, field):
    rows = [dict(r) for r in blimp._builtin_table() if r["UID"] == BLIMP_UID][:4]
    damage(rows[2])
    folder = tmp_path / "blimp"
    folder.mkdir()
    path = folder / f"{BLIMP_UID}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    # before: KeyError: 'sentence_bad' from deep in minimal_pairs, without file or line
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 4: BLiMP row unusable: {field}")):
        blimp.load_paradigm(BLIMP_UID, tmp_path)


def test_a_changed_corpus_is_read_again(tmp_path, data_dir):
    folder = tmp_path / "wikitext" / "wikitext-2"
    shutil.copytree(data_dir / "wikitext" / "wikitext-2", folder)
    first = load_texts("wikitext", tmp_path)
    [valid] = [p for p in folder.iterdir() if "valid" in p.name]
    valid.write_text(" = Heading = \n\n A new first paragraph of the corpus . \n\n")
    again = load_texts("wikitext", tmp_path)        # before: the old paragraphs (cached by folder)
    assert again != first and any("A new first paragraph" in t for t in again)
