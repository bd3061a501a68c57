"""A check shared by the registry tests (toy element format, toy composite family): a directory holding a
registered format the other targets do not declare exports exactly to native and is refused by every other
registered target, in one line that names the spec, the family and a layer, with nothing written."""
from __future__ import annotations

import torch

import mixq
from mixq.cli import main
from mixq.export.registry import EXPORTERS


def native_exact_others_refuse(d, ids, expect, spec: str, word: str, layer: str, tmp_path, capsys) -> None:
    assert main(["export", str(d), "--format", "native", "--out", str(tmp_path / "n")]) == 0  # exact
    again, _, _ = mixq.load_quantized(tmp_path / "n")
    assert torch.equal(again(ids).logits, expect)
    capsys.readouterr()
    for fmt in (t for t in EXPORTERS if t != "native"):  # every registered target but native refuses it
        assert main(["export", str(d), "--format", fmt, "--out", str(tmp_path / fmt)]) == 2, fmt
        err = capsys.readouterr().err
        assert err.startswith("mixq: error:") and err.count("\n") == 1, err
        assert spec in err and word in err and layer in err, err
        assert not (tmp_path / fmt).exists()
