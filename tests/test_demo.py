"""The demo's code path (measure → uniform and mixed plans → RTN/GPTQ → table) on a tiny model."""
import json

import mixq.demo as demo


def test_demo_runs_end_to_end(tiny_model, tiny_tokenizer, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "load_model", lambda name: (tiny_model("llama"), tiny_tokenizer))
    out = tmp_path / "demo.json"
    rows = demo.run_demo(tokens=256, bpw=3.5, nsamples=4, seqlen=64, out=str(out), progress=False)
    text = capsys.readouterr().out
    assert "uniform" in text and "mixed" in text
    assert [r["method"] for r in rows] == ["fp32", "rtn", "rtn", "gptq", "gptq"]
    assert all(r["bpw"] <= 3.5 for r in rows[1:])
    assert json.loads(out.read_text())["budget_bpw"] == 3.5
