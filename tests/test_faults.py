"""Faults a hostile but realistic user hits (issue 17): every one is a single ``mixq: error:`` line and exit 2,
never a traceback, and what a run writes is readable by other users."""
import pytest

from mixq.cli import main


def _one_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mixq: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert needle in err, err
    return err


@pytest.fixture
def qdir(tiny_dir, tmp_path):
    """A native mixq directory of the tiny llama (RTN, fast)."""
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--spec", "W4-g32", "--method", "rtn", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("command", [["eval", "{d}", "--tokens", "64", "--seqlen", "32"],
                                     ["zeroshot", "{d}"]])
def test_directory_without_mixq_json(qdir, command, capsys):
    (qdir / "mixq.json").unlink()
    capsys.readouterr()
    assert main([c.format(d=qdir) for c in command]) == 2
    _one_line(capsys, "not a mixq directory")
