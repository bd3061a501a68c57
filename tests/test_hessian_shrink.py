"""GPTQ's error feedback through a Hessian shrunk toward its diagonal (``hessian_shrink``)."""
import copy

import pytest
import torch

from mixq import api
from mixq.algorithms.gptq import shrink_hessian
from mixq.calib.checkpoint import walk_key
from mixq.cli import build_parser, main
from mixq.recipe import recipe_record
from tiny import make_tiny


def test_shrink_scales_the_off_diagonal_only():
    torch.manual_seed(0)
    X = torch.randn(64, 6)
    H = X.T @ X
    assert shrink_hessian(H, 0.0) is H
    S = shrink_hessian(H, 0.25)
    assert torch.allclose(S.diagonal(), H.diagonal())
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.allclose(S[off], 0.75 * H[off])
    assert torch.equal(shrink_hessian(H, 1.0), torch.diag(H.diagonal()))
    assert torch.equal(H, X.T @ X)  # the input is left alone
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            shrink_hessian(H, bad)


def _gptq(model, ids, **kw):
    return api.quantize_model(model, api.resolve_specs(model, "W3-g32"), method="gptq", calib_ids=ids,
                              progress=False, **kw)


def test_the_walk_feeds_back_through_the_shrunk_hessian():
    torch.manual_seed(0)
    base = make_tiny("llama")
    ids = torch.randint(0, base.config.vocab_size, (4, 64))
    plain, shrunk, rounded = (copy.deepcopy(base) for _ in range(3))
    r0 = _gptq(plain, ids)
    r1 = _gptq(shrunk, ids, hessian_shrink=0.5)
    _gptq(rounded, ids, hessian_shrink=1.0)
    w = "model.layers.1.mlp.down_proj.weight"
    s0, s1, s2 = (m.state_dict()[w] for m in (plain, shrunk, rounded))
    assert not torch.equal(s0, s1) and not torch.equal(s1, s2)
    # the reported proxy loss is tr(dW H dW^T) on the walk's own H whatever H steered the feedback: GPTQ on that
    # H itself leaves less of it over the whole model than the shrunk feedback
    assert sum(r0.proxy_loss.values()) < sum(r1.proxy_loss.values())
    with pytest.raises(ValueError, match="shrink"):
        _gptq(copy.deepcopy(base), ids, hessian_shrink=2.0)


def test_shrink_is_in_the_checkpoint_key_and_the_recipe():
    m = make_tiny("llama")
    ids = torch.zeros(2, 8, dtype=torch.long)
    specs = api.resolve_specs(m, "W4-g32")
    assert "hessian_shrink" not in walk_key(m, ids, specs)
    assert walk_key(m, ids, specs, hessian_shrink=0.1)["hessian_shrink"] == 0.1
    args = build_parser().parse_args(["quantize", "--bpw", "3", "--hessian-shrink", "0.37", "--out", "x"])
    assert recipe_record(args)["deviations"] == {"hessian_shrink": 0.37}


def test_cli_refuses_a_shrink_out_of_range(tmp_path, capsys):
    assert main(["quantize", "--spec", "W4-g32", "--hessian-shrink", "1.5", "--out", str(tmp_path / "q")]) == 2
    assert "--hessian-shrink 1.5 is not in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
