"""Faults a hostile but realistic user hits (issue 17): every one is a single ``mixq: error:`` line and exit 2,
never a traceback, and what a run writes is readable by other users."""
import os

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


# ---------------------------------------------------------------------------- file modes (issue 17 item 7)
def _modes(root) -> dict:
    """``{relative path: permission bits}`` of everything under ``root`` (and ``root`` itself as ``"."``)."""
    out = {".": root.stat().st_mode & 0o777}
    out.update({str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in root.rglob("*")})
    return out


def _expect_public(root, umask: int) -> None:
    modes = _modes(root)
    want = {k: (0o777 if (root / k).is_dir() else 0o666) & ~umask for k in modes}
    assert modes == want, {k: oct(v) for k, v in modes.items() if v != want[k]}


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_every_output_file_is_as_readable_as_the_directory(umask, tiny_dir, tmp_path):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--spec", "W4-g32", "--method", "gptq", "--nsamples", "2",
                 "--seqlen", "16", "--calib", "ptb", "--out", str(q)]) == 0
    assert {"rest.safetensors", "quantized.safetensors", "mixq.json"} <= set(os.listdir(q))
    _expect_public(q, umask)
    for fmt in ("compressed-tensors", "gptq", "native"):
        out = tmp_path / fmt
        assert main(["export", str(q), "--format", fmt, "--out", str(out)]) == 0
        assert any(out.glob("*.safetensors"))
        _expect_public(out, umask)
    assert main(["export", str(q), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    for f in ("m.gguf", "m.gguf.report.json"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~umask


def test_walk_checkpoint_blocks_are_ordinary_files(umask, tiny_model, tmp_path):
    import torch

    from mixq import api

    model = tiny_model("llama")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    api.quantize_model(model, api.resolve_specs(model, "W4-g32"), method="gptq", calib_ids=ids, progress=False,
                       checkpoint=tmp_path / "walk")
    assert any((tmp_path / "walk").glob("block-*.safetensors"))
    modes = _modes(tmp_path / "walk")
    assert all(m == 0o666 & ~umask for k, m in modes.items() if k != "."), {k: oct(v) for k, v in modes.items()}
