"""A user's mistake on the command line is one line on stderr, ``python -m kn_utils <command>: error:
...``, and exit status 2 (argparse's convention), found before any model loads or anything is
computed; never a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kn_utils as ku
from kn_utils.cli import main
from kn_utils.data import pararel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_model(monkeypatch):
    """Every case here must fail before a model loads."""
    monkeypatch.setattr(ku, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def run_cli(capsys, argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as stop:     # argparse's own errors exit through SystemExit
        rc = stop.code
    return rc, capsys.readouterr().err


def assert_one_line(rc, err, command, *needles):
    # a model that did load draws progress bars (transformers' "Loading weights"): not messages
    lines = [line for line in err.replace("\r", "\n").strip().splitlines() if "it/s]" not in line and line]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m kn_utils {command}: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


CASES = {
    "dtype abc": (["evaluate-edits", "--dtype", "abc"], "--dtype 'abc' is not a floating-point dtype"),
    "dtype int8": (["evaluate-edits", "--dtype", "int8"], "--dtype 'int8'"),
    "device tpu": (["demo", "--device", "tpu"], "--device 'tpu'"),
    "device nonsense": (["trace", "--prompt", "a b", "--subject", "a", "--device", "cpu:x:y"], "--device"),
    "evaluate-edits n 0": (["evaluate-edits", "--n", "0"], "argument --n: must be a positive integer, got 0"),
    "evaluate-edits n -2": (["evaluate-edits", "--n", "-2"], "argument --n"),
    "evaluate-edits n 1.5": (["evaluate-edits", "--n", "1.5"], "'1.5' is not an integer"),
    "localise n 0": (["localise", "--paradigm", "sva_1", "--n", "0"], "argument --n"),
    "localise n -5": (["localise", "--paradigm", "sva_1", "--n", "-5"], "argument --n"),
    "localise n 1": (["localise", "--paradigm", "sva_1", "--n", "1"], ">= 2"),
    "localise tau 2": (["localise", "--paradigm", "sva_1", "--tau", "2"], "argument --tau"),
    "localise unknown paradigm": (["localise", "--paradigm", "no_such_paradigm"], "unknown BLiMP paradigm"),
    "trace samples 0": (["trace", "--prompt", "a b", "--subject", "a", "--samples", "0"], "--samples"),
    "trace noise abc": (["trace", "--prompt", "a b", "--subject", "a", "--noise", "abc"], "--noise"),
    "trace noise -1": (["trace", "--prompt", "a b", "--subject", "a", "--noise", "-1"], "--noise"),
    "unknown option": (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    "missing option": (["trace", "--prompt", "x"], "--subject"),
    "reproduce size 1.5": (["reproduce", "--size", "rome_n=1.5"], "rome_n"),
    "reproduce size bogus": (["reproduce", "--size", "bogus=3"], "bogus"),
    "reproduce size no value": (["reproduce", "--size", "rome_n"], "NAME=VALUE"),
    "reproduce size no name": (["reproduce", "--size", "=3"], "NAME=VALUE"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_and_status_2(capsys, no_model, case):
    argv, needle = CASES[case]
    rc, err = run_cli(capsys, argv)
    assert_one_line(rc, err, argv[0], needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_on_a_machine_without_it(capsys, no_model, device):
    # before: torch's AssertionError "Torch not compiled with CUDA enabled" and a traceback
    rc, err = run_cli(capsys, ["demo", "--device", device])
    assert_one_line(rc, err, "demo", "CUDA is not available on this machine")


@pytest.mark.parametrize("command", [["evaluate-edits"], ["localise", "--paradigm", "sva_1"],
                                     ["trace", "--prompt", "a b", "--subject", "a"]])
def test_out_that_is_a_file_is_refused_before_the_model(capsys, no_model, tmp_path, command):
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    rc, err = run_cli(capsys, [*command, "--out", a_file])
    assert_one_line(rc, err, command[0], f"--out '{a_file}' is a file, not a folder")


def test_missing_files_and_folders(capsys, no_model, tmp_path):
    rc, err = run_cli(capsys, ["evaluate-edits", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "o"])
    assert_one_line(rc, err, "evaluate-edits", "data directory not found")


def test_a_truncated_data_file_is_one_line_naming_it(capsys, no_model, tmp_path):
    folder = tmp_path / "data" / "pararel"
    folder.mkdir(parents=True)
    path = folder / "data_all_allbags.json"
    text = pararel.BUILTIN_BAGS.read_text()
    path.write_text(text[: len(text) // 3])
    rc, err = run_cli(capsys, ["evaluate-edits", "--data-dir", tmp_path / "data", "--out", tmp_path / "o"])
    assert_one_line(rc, err, "evaluate-edits", str(path), "not valid JSON")


def test_a_missing_model_folder(capsys, tmp_path):
    rc, err = run_cli(capsys, ["trace", "--model", tmp_path / "no-model", "--device", "cpu", "--prompt", "a b",
                               "--subject", "a", "--out", tmp_path / "o"])
    assert_one_line(rc, err, "trace", "model folder not found")


def test_trace_input_mistakes_are_one_line(capsys, tmp_path):
    from tiny_models import save_tiny

    model = save_tiny("gpt2", tmp_path / "tiny-gpt2")
    common = ["trace", "--model", model, "--device", "cpu", "--out", tmp_path / "o"]
    for extra, needle in [(["--prompt", "The capital of France is", "--subject", "Germany"], "not found"),
                          (["--prompt", "The Iranian officials met in", "--subject", "Iran"], "longer word"),
                          (["--prompt", "   ", "--subject", "x"], "prompt")]:
        rc, err = run_cli(capsys, [*common, *extra])
        assert_one_line(rc, err, "trace", needle)


def test_an_error_after_the_inputs_were_checked_keeps_its_traceback(capsys, tmp_path, monkeypatch):
    """A ValueError from inside the computation is a fault, not the user's: it is not hidden."""
    from tiny_models import save_tiny

    import kn_utils.tracing as tracing
    model = save_tiny("gpt2", tmp_path / "tiny-gpt2")

    def broken(*args, **kwargs):
        raise ValueError("an internal fault")
    monkeypatch.setattr(tracing, "causal_trace", broken)
    with pytest.raises(ValueError, match="an internal fault"):
        main(["trace", "--model", model, "--device", "cpu", "--prompt", "The capital of France is",
              "--subject", "France", "--out", str(tmp_path / "o")])


@pytest.mark.slow  # python -m kn_utils in subprocesses
def test_the_real_command_line(tmp_path):
    """The same through ``python -m kn_utils``: stderr is exactly one line, status 2."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    for argv in (["evaluate-edits", "--dtype", "int8"], ["localise", "--paradigm", "sva_1", "--n", "-5"]):
        out = subprocess.run([sys.executable, "-m", "kn_utils", *argv], cwd=tmp_path, capture_output=True,
                             text=True, env=env, timeout=300)
        assert out.returncode == 2, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert out.stderr.startswith(f"python -m kn_utils {argv[0]}: error: ")


def test_an_empty_read_only_model_cache_is_one_line(capsys, monkeypatch, tmp_path):
    from kn_utils.cache import CacheNotWritable

    def load(*args, **kwargs):
        raise CacheNotWritable(f"the model cache {tmp_path} is read-only and does not hold the model yet")
    monkeypatch.setattr(ku, "load_model", load)
    rc, err = run_cli(capsys, ["demo", "--device", "cpu"])
    assert_one_line(rc, err, "demo", f"the model cache {tmp_path} is read-only")
