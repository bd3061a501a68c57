"""Measurement of a model spread by accelerate's ``device_map`` (here: CPU and disk offload) equals the plain one."""
import torch

from mixq.calib.dispatch import Placement, is_dispatched, parse_max_memory
from mixq.config import parse_spec
from mixq.measure import measure
from mixq.models import load_model, model_fingerprint

CANDS = [parse_spec(n) for n in ["W2-g32-asym", "W3-g64", "W4-g32", "NF4-g64", "W8-channel", "FP16", "W4-g64+ip"]]


def _offloaded_map(n_blocks: int, on_disk: range) -> dict:
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": ("disk" if i in on_disk else "cpu") for i in range(n_blocks)})
    return dm


def test_disk_offloaded_model_measures_like_the_plain_one(tiny_model, tiny_tokenizer, tmp_path):
    d = tmp_path / "tiny4"
    tiny_model("llama", layers=4).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    plain, _ = load_model(str(d))
    spread, _ = load_model(str(d), placement=Placement(_offloaded_map(4, range(1, 4)),
                                                        offload_folder=str(tmp_path / "offload")))
    assert is_dispatched(spread) and not is_dispatched(plain)
    q = spread.model.layers[2].self_attn.q_proj
    assert q.weight.is_meta  # really offloaded: the walk has to materialize it
    assert model_fingerprint(spread) == model_fingerprint(plain)  # offloaded entries hashed from their store
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    for metric, algorithm in (("kfac", "gptq"), ("block", "rtn")):
        a = measure(plain, ids, CANDS, metric=metric, algorithm=algorithm, grad_samples=2, progress=False)
        b = measure(spread, ids, CANDS, metric=metric, algorithm=algorithm, grad_samples=2, progress=False)
        assert len(b.layers) == 28
        assert a.to_dict()["layers"] == b.to_dict()["layers"], metric
        assert a.meta["model"] == b.meta["model"]
    # the walk left the offloaded blocks offloaded, with their weights unchanged
    assert q.weight.is_meta
    with torch.no_grad():
        assert torch.equal(spread(ids).logits, plain(ids).logits)


def test_parse_max_memory():
    assert parse_max_memory("0=70GiB, 1=60GiB,cpu=200GiB") == {0: "70GiB", 1: "60GiB", "cpu": "200GiB"}
    assert parse_max_memory("gpu=40GiB,cpu=1GiB", gpus=[2, 3]) == {2: "40GiB", 3: "40GiB", "cpu": "1GiB"}
    assert parse_max_memory(None) is None
    for bad in ("0:70GiB", "tpu=1GiB", "cpu="):
        try:
            parse_max_memory(bad)
        except ValueError as e:
            assert "--max-memory" in str(e)
        else:
            raise AssertionError(bad)
    assert Placement("auto", {0: "1GiB"}, "/tmp/x").kwargs() == {"device_map": "auto", "max_memory": {0: "1GiB"},
                                                                  "offload_folder": "/tmp/x"}


def _cli_files(tmp_path, candidates: str):
    """A corpus, a candidates file and a device map offloading both blocks of the tiny llama to disk."""
    import json

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: pack my box with five dozen liquor jugs {i * 3}." for i in range(200)))
    cands = tmp_path / "cands.txt"
    cands.write_text(candidates)
    dm = tmp_path / "map.json"
    dm.write_text(json.dumps(_offloaded_map(2, range(0, 2))))
    return corpus, cands, dm


def test_cli_device_map_file(tiny_dir, tmp_path):
    """``mixq measure --device-map FILE --offload-folder DIR`` writes the table of a plain ``mixq measure``."""
    import json

    from mixq.cli import main

    corpus, cands, dm = _cli_files(tmp_path, "W2-g32-asym\nW4-g32\nW8-channel\nFP16\n")
    common = ["measure", "--model", str(tiny_dir), "--calib", str(corpus), "--nsamples", "2", "--seqlen", "32",
              "--grad-samples", "1", "--algorithm", "gptq", "--candidates", str(cands)]
    assert main([*common, "--out", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--device-map", str(dm), "--offload-folder", str(tmp_path / "off"),
                 "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["layers"] == b["layers"] and a["meta"]["model"] == b["meta"]["model"]
    assert main([*common, "--max-memory", "cpu=1GiB", "--out", str(tmp_path / "c.json")]) == 2  # needs --device-map


def test_local_gpus_split_the_node(monkeypatch):
    from mixq.measure.distributed import local_gpus

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert local_gpus(4) == [0, 1, 2, 3]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_gpus(8) == [4, 5, 6, 7]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert local_gpus(8) == [5]


def test_cli_quantize_with_a_device_map_writes_what_the_plain_run_writes(tiny_dir, tmp_path):
    """``mixq quantize --bpw --device-map FILE --offload-folder DIR`` (every block offloaded to disk: the measurement
    and the GPTQ walk materialize each one in turn, the save reads the untouched tensors from the offload store)
    writes the same plan and the same tensors as the plain run; a --device this machine lacks is refused."""
    import json

    from safetensors.torch import load_file

    from mixq.cli import main

    corpus, cands, dm = _cli_files(tmp_path, "W2-g32-asym\nW4-g32\nW8-channel\n")
    common = ["quantize", "--model", str(tiny_dir), "--calib", str(corpus), "--nsamples", "2", "--seqlen", "32",
              "--grad-samples", "1", "--candidates", str(cands), "--bpw", "4", "--finetune", "none"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--device-map", str(dm), "--offload-folder", str(tmp_path / "off"),
                 "--out", str(tmp_path / "b")]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert json.loads((a / "plan.json").read_text())["layers"] == json.loads((b / "plan.json").read_text())["layers"]
    for f in ("quantized.safetensors", "rest.safetensors"):
        ta, tb = load_file(a / f), load_file(b / f)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    if not torch.cuda.is_available():
        assert main([*common, "--device", "cuda", "--out", str(tmp_path / "c")]) == 2
    assert main([*common, "--device", "tpu", "--out", str(tmp_path / "d")]) == 2
