"""The demo's code path (measure → uniform and mixed plans → RTN/GPTQ → table) on a tiny model."""
import json
from collections import Counter

import mixq.data
import mixq.demo as demo


def test_demo_runs_end_to_end(tiny_model, tiny_tokenizer, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MIXQ_CACHE_DIR", str(tmp_path / "cache"))
    fortunes = tmp_path / "fortunes"  # a stand-in for Debian's databases, so the test runs where they are missing
    fortunes.mkdir()
    (fortunes / "wisdom").write_text("\n%\n".join(f"Quote {i}: a stitch in time saves nine, or so they say." * 3
                                                   for i in range(200)))
    (fortunes / "wisdom.dat").write_bytes(b"")
    monkeypatch.setenv("MIXQ_FORTUNES_DIR", str(fortunes))
    monkeypatch.setattr(demo, "load_model", lambda name: (tiny_model("llama"), tiny_tokenizer))
    seen = Counter()  # every text tokenised in the run, by content: each corpus once per run
    tokenize = mixq.data.tokenize
    monkeypatch.setattr(mixq.data, "tokenize",
                        lambda text, *a, **k: (seen.update([hash(text)]), tokenize(text, *a, **k))[1])
    out = tmp_path / "demo.json"
    rows = demo.run_demo(tokens=256, bpw=3.5, nsamples=4, seqlen=64, out=str(out), progress=False)
    text = capsys.readouterr().out
    assert "uniform" in text and "mixed" in text
    assert [r["method"] for r in rows] == ["fp32", "rtn", "rtn", "gptq", "gptq"]
    assert all(r["bpw"] <= 3.5 for r in rows[1:])
    doc = json.loads(out.read_text())
    assert doc["budget_bpw"] == 3.5 and doc["calibration"]["corpus"] == "self+ptb"
    # both domains side by side, each with its own protocol
    assert set(doc["protocols"]) == {"ptb", "fortunes"} and all(set(r["domains"]) == {"ptb", "fortunes"} for r in rows)
    assert "KL fortunes" in text
    assert len(seen) == 3 and set(seen.values()) == {1}  # PTB train (calibration), PTB test, fortunes test: once each
