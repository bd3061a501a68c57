"""One spec grammar: ``parse_spec`` reads plain and composite names alike, so ``mixq quantize --spec`` takes every
intra-tensor composite that README lists, end to end (quantize -> save -> load -> eval) on a tiny model."""
import json
import re
from pathlib import Path

import pytest

from mixq.cli import main
from mixq.config import CompositeSpec, QuantSpec, compose, parse_spec
from mixq.export.native import composite_layers, load_quantized, read_info

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_composites() -> list[str]:
    """The spec names in README's "Intra-tensor candidates" bullet."""
    text = README.read_text()
    bullet = text[text.index("**Intra-tensor candidates**"):]
    bullet = bullet[:bullet.index("\n- ")]
    return [n for n in re.findall(r"`([^`\s]+)`", bullet) if "+" in n or n.startswith(("SLIM", "BIN"))]


def test_readme_lists_the_composites():
    assert len(readme_composites()) >= 8 and "W3-g64+o0.5" in readme_composites()


@pytest.mark.parametrize("name", ["W4-g128", "NVFP4", "MXFP4-mse", "FP8-e5m2", "W3-g64+o0.5", "SLIM3-g64",
                                  "BIN-g64+r32", "W3-g16+sq3+o0.25", "NF3-g64+d4", "W3-g64+h5"])
def test_one_parser_round_trips_names_and_dicts(name):
    s = parse_spec(name)
    assert isinstance(s, CompositeSpec) == ("+" in name or name.startswith(("SLIM", "BIN")))
    assert parse_spec(s.name) == s and parse_spec(s.to_dict()) == s and parse_spec(s) is s


def test_one_parser_errors_and_compose():
    assert compose("W3-g64", outliers=0.5) == parse_spec("W3-g64+o0.5")
    assert type(parse_spec("W3-g64")) is QuantSpec
    with pytest.raises(ValueError, match="bad extension"):
        parse_spec("W3-g64+x1")
    with pytest.raises(ValueError, match="unknown spec"):
        parse_spec("Q9+o1")
    with pytest.raises(ValueError, match="already a composite"):
        compose("W3-g64+o0.5", columns=4)


def test_quantize_spec_takes_every_readme_composite(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"the {w} sat on the mat number {i} .\n" for i, w in enumerate(["cat", "dog"] * 30)))
    for k, name in enumerate(readme_composites()):
        spec = parse_spec(name)
        out = tmp_path / f"q{len(list(tmp_path.iterdir()))}"
        method = [] if k == 0 else ["--method", "rtn"]  # the default GPTQ once: each composite's GPTQ is in test_intra
        assert main(["quantize", "--model", str(tiny_dir), "--spec", name, "--out", str(out), *method]) == 0, name
        info = read_info(out)
        assert info["spec"] == spec.name and len(composite_layers(info)) == len(info["layers"]) > 0, name
        assert {parse_spec(layer["spec"]) for layer in info["layers"].values()} == {spec}, name
        model, _, _ = load_quantized(out)
        assert model is not None
        res = tmp_path / "r.json"
        assert main(["eval", str(out), "--corpus", str(corpus), "--tokens", "96", "--seqlen", "32",
                     "--out", str(res), "--force"]) == 0, name
        assert json.loads(res.read_text())["perplexity"] > 1, name
    assert "error" not in capsys.readouterr().err
