"""The statistics artifact (``mixq.statistics``) and the budget stage (``mixq.plan_for_budget``)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import mixq
from mixq.allocate import Budget
from mixq.api import iter_layers
from mixq.models import model_fingerprint

CANDS = ["W2-g32", "W4-g32", "W8-g32"]


def _ids(n=4, L=16, seed=0):
    return torch.randint(0, 64, (n, L), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- statistics
def test_statistics_round_trip_frozen_and_keyed_to_their_rows(tiny_model, tmp_path):
    m = tiny_model("llama")
    ids = _ids()
    st = mixq.statistics(m, ids, hessian=True, progress=False)
    assert isinstance(st, mixq.Statistics) and st.hessian and st.model == model_fingerprint(m)
    assert len(st.layers) == sum(1 for _ in iter_layers(m))
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.hessian = False
    with pytest.raises(TypeError):
        st.layers["x"] = None  # read-only mapping
    H = st.hessians()
    f = next(iter(H))
    assert H[f].shape[0] == H[f].shape[1] and torch.allclose(H[f], H[f].T)
    p = st.save(tmp_path / "stats.safetensors")
    with pytest.raises(FileExistsError):
        st.save(p)
    back = mixq.Statistics.load(p)
    assert back.calibration == st.calibration and back.model == st.model and list(back.layers) == list(st.layers)
    for fqn in st.layers:
        assert torch.equal(back.layers[fqn].absmax, st.layers[fqn].absmax)
        assert torch.equal(back.layers[fqn].H, st.layers[fqn].H)
    back.check(ids)
    with pytest.raises(ValueError, match="other calibration rows"):
        back.check(_ids(seed=1))


def test_statistics_without_hessians_say_how_to_get_them(tiny_model):
    st = mixq.statistics(tiny_model("llama"), _ids(), layers="mlp", progress=False)
    assert st.layers and all("mlp" in f for f in st.layers)
    with pytest.raises(ValueError, match="hessian=True"):
        st.hessians()


def test_static_activation_scales_from_saved_statistics_equal_a_fresh_pass(tiny_model, tmp_path):
    from mixq.runtime.act_quant import calibrate_act_absmax

    m = tiny_model("llama")
    ids = _ids()
    fresh = calibrate_act_absmax(m, ids)
    saved = mixq.Statistics.load(mixq.statistics(m, ids, progress=False).save(tmp_path / "s.safetensors")).absmax()
    assert set(saved) == set(fresh) and all(torch.equal(saved[f], fresh[f]) for f in fresh)


def test_statistics_load_refuses_other_files_and_newer_versions(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a mixq statistics file"):
        mixq.Statistics.load(other)
    newer = tmp_path / "n.safetensors"
    save_file({"x": torch.zeros(2)}, str(newer), metadata={"mixq": json.dumps(
        {"format": "mixq-statistics", "version": 99, "calibration": "", "hessian": False, "layers": []})})
    with pytest.raises(ValueError, match="upgrade mixq"):
        mixq.Statistics.load(newer)


# ---------------------------------------------------------------------------- budget stage
def test_budget_stage_rotates_before_measuring(tiny_model):
    m = tiny_model("llama")
    before = model_fingerprint(m)
    bp = mixq.plan_for_budget(m, _ids(), Budget(bpw=4.5), rotate=True, candidates=CANDS, metric="kfac",
                              grad_samples=2, block_samples=2, progress=False)
    assert isinstance(bp, mixq.BudgetPlan) and bp.rotated and bp.measured
    assert model_fingerprint(m) != before  # rotated in place ...
    assert bp.table.meta["model"] == model_fingerprint(m)  # ... and the rotated weights were measured
    assert bp.table.meta["rotate"] is True and bp.plan.meta["rotate"] is True
    assert bp.plan.achieved_bpw <= 4.5


def test_budget_stage_refuses_a_table_of_the_unrotated_weights_with_rotate(tiny_model):
    m = tiny_model("llama")
    plain = mixq.plan_for_budget(m, _ids(), Budget(bpw=4.5), candidates=CANDS, metric="kfac", grad_samples=2,
                                 block_samples=2, progress=False)
    assert not plain.rotated and plain.table.meta["rotate"] is False
    again = mixq.plan_for_budget(m, None, Budget(bpw=3.5), table=plain.table)  # a given table: nothing measured
    assert not again.measured and again.plan.achieved_bpw <= 3.5
    with pytest.raises(ValueError, match="rotated"):
        mixq.plan_for_budget(m, None, Budget(bpw=4.5), table=plain.table, rotate=True)


def test_budget_stage_reuses_a_finished_measurement_of_the_same_rows(tiny_model, tmp_path, monkeypatch):
    m = tiny_model("llama")
    ids = _ids()
    scratch = tmp_path / "m.json"
    kw = dict(candidates=CANDS, metric="kfac", grad_samples=2, block_samples=2, scratch=scratch, progress=False)
    first = mixq.plan_for_budget(m, ids, Budget(bpw=4.5), **kw)
    assert scratch.exists()

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr("mixq.measure.measure", no_measuring)
    again = mixq.plan_for_budget(m, ids, Budget(bpw=4.5), **kw)
    assert again.plan.layers == first.plan.layers
    with pytest.raises(AssertionError, match="measured again"):  # other rows: the scratch table is not theirs
        mixq.plan_for_budget(m, _ids(seed=1), Budget(bpw=4.5), **kw)
