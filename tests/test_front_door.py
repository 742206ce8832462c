"""The front door: settings checked before any work (one line naming the flag or parameter, nothing
written), and a command line that answers --help and argparse errors without loading torch."""
from __future__ import annotations

import subprocess
import sys

import pytest

import attnprobe
from attnprobe.app.cli import main
from attnprobe.errors import AttnprobeError
from attnprobe.io.inputs import check_inputs
from attnprobe.settings import DistillSettings, EvaluateSettings, RunSettings, ScoreSettings


def refused(argv, capsys, *words):
    """Exit 2 and exactly one stderr line holding each of `words`."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("flags,words", [
    (["--batch-size", "-1"], ["--batch-size -1", "at least 1"]),
    (["--device", "cuda:7"], ["--device cuda:7", "this machine has", "cpu"]),
    (["--device", "tpu"], ["--device tpu", "this machine has"]),
])
def test_evaluate_refuses_bad_settings_before_any_work(tmp_path, capsys, flags, words):
    model, data = tmp_path / "m.pt", tmp_path / "data"
    model.write_bytes(b"not read: the settings are refused first")
    data.mkdir()
    before = listing(tmp_path)
    refused(["evaluate", "--model", model, "--data", data, "--json", tmp_path / "out" / "e.json", *flags],
            capsys, *words)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("argv,words", [
    (["score", "--blocks", "1", "1"], ["--blocks 1 1", "1 is given twice"]),
    (["run", "--num-select", "4", "--strategies", "dfnd", "dfnd"], ["--strategies dfnd dfnd", "dfnd is given twice"]),
    (["distill", "--selection", "S", "--epochs", "1", "--probe-blocks", "3", "3"], ["--probe-blocks 3 3", "twice"]),
])
def test_duplicates_in_a_list_flag_are_refused(tmp_path, capsys, argv, words):
    cmd, *rest = argv
    paths = {"score": ["--teacher", tmp_path / "t.pt", "--wild", tmp_path, "--out", tmp_path / "s.parquet"],
             "run": ["--teacher", tmp_path / "t.pt", "--wild", tmp_path, "--out", tmp_path / "RUN"],
             "distill": ["--teacher", tmp_path / "t.pt", "--wild", tmp_path, "--out", tmp_path / "st"]}[cmd]
    refused([cmd, *paths, *rest], capsys, *words)
    assert listing(tmp_path) == []


def test_settings_objects_check_duplicates_and_devices():
    with pytest.raises(AttnprobeError, match="--probe-blocks 3 3: 3 is given twice"):
        DistillSettings(epochs=1, probe_blocks=[3, 3])
    with pytest.raises(AttnprobeError, match="--strategies"):
        RunSettings(strategies=["dfnd", "dfnd"])
    assert ScoreSettings(device="cpu", blocks=(1, 2)).blocks == [1, 2]  # a tuple is a list
    assert EvaluateSettings(device=None).device is None  # no device given: torch is not asked


def test_api_refuses_settings_of_the_wrong_class_and_a_dict(tmp_path):
    for wrong, what in ((ScoreSettings(), "a ScoreSettings"), ({"batch_size": 8}, "a dict")):
        with pytest.raises(TypeError, match=f"settings= takes a EvaluateSettings .*not {what}") as e:
            attnprobe.evaluate(tmp_path / "m.pt", tmp_path, settings=wrong)
        assert len(str(e.value).splitlines()) == 1
    with pytest.raises(AttnprobeError, match="has no setting 'batchsize'"):
        attnprobe.evaluate(tmp_path / "m.pt", tmp_path, batchsize=8)


def test_api_refuses_wrong_types_naming_the_parameter(tmp_path):
    with pytest.raises(TypeError, match="--wild takes a path .*not a list"):
        attnprobe.score(tmp_path / "t.pt", [tmp_path], tmp_path / "s.parquet")
    with pytest.raises(AttnprobeError, match="--blocks '3': expected a list of whole numbers"):
        attnprobe.score(tmp_path / "t.pt", tmp_path, tmp_path / "s.parquet", blocks="3")
    with pytest.raises(AttnprobeError, match="--strategies 'dfnd': expected a list"):
        RunSettings(strategies="dfnd")
    with pytest.raises(AttnprobeError, match="--device \\['cpu'\\]: expected text"):
        EvaluateSettings(device=["cpu"])
    assert listing(tmp_path) == []


def test_inputs_are_checked_by_kind(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"x")
    with pytest.raises(AttnprobeError, match=f"--teacher {run} is a folder, not a checkpoint file; .*e.g. --teacher {run / 'best.pt'}"):
        check_inputs({"--teacher": (run, "checkpoint")})
    with pytest.raises(AttnprobeError, match="--data .* is not a file|--data .* is a file"):
        check_inputs({"--data": (run / "best.pt", "dir")})
    with pytest.raises(AttnprobeError, match="--scores .* does not exist"):
        check_inputs({"--scores": (tmp_path / "none.parquet", "table")})
    with pytest.raises(AttnprobeError, match="--wild is empty"):
        check_inputs({"--wild": ("", "pool")})
    check_inputs({"--wild": (f"{tmp_path}/{{00000..00003}}.tar", "pool"), "--test": (None, "dir"),
                  "source": ("hf-hub:org/name", "source"), "--model": (run / "best.pt", "checkpoint")})


def test_help_and_argparse_errors_do_not_import_torch():
    code = ("import sys\n"
            "from attnprobe.app.cli import main\n"
            "for argv in (['--help'], ['distill', '--help'], ['run', '--help'], ['score', '--batchsize', '1']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = [m for m in ('torch', 'timm', 'pandas', 'pyarrow', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "import attnprobe\n"
            "assert 'distill' in attnprobe.__all__ and 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_public_names_are_lazy_but_importable():
    from attnprobe import AttnprobeError as E
    from attnprobe import distill, load_checkpoint
    assert E is AttnprobeError and callable(distill) and callable(load_checkpoint)
    assert set(attnprobe.__all__) <= set(dir(attnprobe))
    with pytest.raises(AttributeError):
        attnprobe.no_such_name  # noqa: B018


def test_run_help_says_a_shared_setting_is_for_every_stage():
    from attnprobe.app.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {o: a.help for a in sub.choices["run"]._actions for o in a.option_strings}
    for flag in ("--batch-size", "--seed", "--workers", "--device", "--resize", "--no-progress"):
        assert helps[flag].endswith("(in run: for every stage)"), flag
    assert "every stage" not in helps["--num-select"]
    distill = {o: a.help for a in sub.choices["distill"]._actions for o in a.option_strings}
    assert "every stage" not in distill["--batch-size"]  # said only in run
