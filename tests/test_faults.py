"""Faults a hostile but realistic user hits (issue 17): every one is a single ``mixq: error:`` line and exit 2,
never a traceback, and what a run writes is readable by other users."""
import errno
import os

import pytest

from mixq.cli import main


def _one_line(capsys, needle: str) -> str:
    """stderr ends in one ``mixq: error:`` line holding ``needle`` (before it: only progress bars of loading)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").split("\n")
    assert lines[-1].startswith("mixq: error:") and err.count("mixq: error:") == 1, err
    assert needle in lines[-1], err
    return lines[-1]


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


# ---------------------------------------------------------------------------- smaller ones (item 8)
def test_empty_spec_is_an_error(tiny_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(tiny_dir), "--spec", "", "--method", "rtn",
                 "--out", str(tmp_path / "q")]) == 2
    _one_line(capsys, "mixq specs")
    assert not (tmp_path / "q").exists()


def test_binary_corpus_names_the_file_and_the_fix(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(bytes(range(256)) * 8)
    assert main(["eval", str(tiny_dir), "--corpus", str(bad), "--tokens", "64", "--seqlen", "16"]) == 2
    err = _one_line(capsys, str(bad))
    assert "UTF-8" in err
    assert main(["quantize", "--model", str(tiny_dir), "--spec", "W4-g32", "--calib", str(bad), "--nsamples", "2",
                 "--seqlen", "16", "--out", str(tmp_path / "q")]) == 2
    _one_line(capsys, "not UTF-8 text")


def test_short_corpus_names_the_tokens_flag(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words\n" * 3)
    assert main(["eval", str(tiny_dir), "--corpus", str(short), "--tokens", "8", "--seqlen", "32"]) == 2
    err = _one_line(capsys, "--tokens")
    assert "max_tokens" not in err.replace("(max_tokens)", "")


@pytest.mark.parametrize("command", [
    ["quantize", "--model", "{m}", "--spec", "W4-g32", "--method", "rtn", "--out", "{f}/q"],
    ["export", "{q}", "--format", "gguf", "--out", "{f}/sub/m.gguf"],
    ["export", "{q}", "--format", "compressed-tensors", "--out", "{f}/ct"],
    ["measure", "--model", "{m}", "--nsamples", "2", "--seqlen", "16", "--out", "{f}/m.json"],
])
def test_out_under_a_regular_file(command, tiny_dir, qdir, tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("x")
    capsys.readouterr()
    assert main([c.format(m=tiny_dir, q=qdir, f=f) for c in command]) == 2
    _one_line(capsys, f"{f} is a file, not a directory")
    assert f.read_text() == "x"


def test_hf_readback_loads_safetensors_only(monkeypatch, tmp_path):
    import transformers

    from mixq.export import hf_readback

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(hf_readback, "load_quantized", lambda *a, **k: (None, None, {}), raising=False)
    monkeypatch.setattr("mixq.export.native.load_quantized", lambda *a, **k: (None, None, {}))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(RuntimeError, match="stop here"):
        hf_readback.check_with_transformers(tmp_path, tmp_path)
    assert seen.get("use_safetensors") is True


# ---------------------------------------------------------------------------- unwritable or full targets (item 2)
def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/fake/out/rest.safetensors")


def test_full_disk_is_one_line(tiny_dir, qdir, tmp_path, capsys, monkeypatch):
    """A disk that fills up while the output is written: exit 2, one line, no temporary left behind."""
    import mixq.export.gguf
    import mixq.export.hf
    import mixq.export.native_write

    monkeypatch.setattr(mixq.export.native_write, "save_file", _full_disk)
    monkeypatch.setattr(mixq.export.hf, "save_file", _full_disk)
    capsys.readouterr()
    assert main(["quantize", "--model", str(tiny_dir), "--spec", "W4-g32", "--method", "rtn",
                 "--out", str(tmp_path / "q2")]) == 2
    _one_line(capsys, "No space left on device; free some space")
    assert main(["export", str(qdir), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    _one_line(capsys, "No space left on device")

    real_open = open

    def gguf_open(path, mode="r", *a, **k):  # the GGUF writer's file fills the disk
        if "w" in mode and ".m.gguf" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", gguf_open)
    rc = main(["export", str(qdir), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    monkeypatch.undo()
    assert rc == 2
    _one_line(capsys, "No space left on device")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["tiny", "q"]), left  # no output, no temporary


def _permissions_bind() -> bool:
    """False where this process writes into a 0555 folder anyway (root with CAP_DAC_OVERRIDE)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o555)
        try:
            with tempfile.TemporaryFile(dir=d):
                return False
        except OSError:
            return True
        finally:
            os.chmod(d, 0o755)


@pytest.mark.skipif(not _permissions_bind(), reason="this user writes in read-only folders (root): "
                    "run under `setpriv --bounding-set=-dac_override,-dac_read_search` to test it")
@pytest.mark.parametrize("command", [
    ["quantize", "--model", "{m}", "--spec", "W4-g32", "--method", "rtn", "--out", "{ro}/q"],
    ["quantize", "--model", "{m}", "--bpw", "4", "--method", "rtn", "--nsamples", "2", "--seqlen", "16",
     "--out", "{ro}/q"],
    ["export", "{q}", "--format", "gguf", "--out", "{ro}/m.gguf"],
    ["export", "{q}", "--format", "compressed-tensors", "--out", "{ro}/ct"],
    ["export", "{q}", "--format", "gptq", "--out", "{ro}/deeper/gptq"],
])
def test_read_only_folder_fails_before_any_work(command, tiny_dir, qdir, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    import mixq.calibset

    def no_calibration(*a, **k):
        raise AssertionError("calibration started before the output was checked")

    monkeypatch.setattr(mixq.calibset, "calibration_for", no_calibration)
    capsys.readouterr()
    try:
        assert main([c.format(m=tiny_dir, q=qdir, ro=ro) for c in command]) == 2
    finally:
        ro.chmod(0o755)
    _one_line(capsys, f"cannot write in {ro}")
    assert os.listdir(ro) == []


def test_unwritable_folder_even_for_root(tiny_dir, tmp_path, capsys, monkeypatch):
    """The pre-flight probe itself is refused (as on a read-only mount, which stops root too)."""
    import tempfile

    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert main(["quantize", "--model", str(tiny_dir), "--spec", "W4-g32", "--method", "rtn",
                 "--out", str(tmp_path / "q")]) == 2
    _one_line(capsys, "Read-only file system")
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------------------- impossible budgets (item 4)
def _no_calibration(monkeypatch):
    import mixq.calibset

    def refuse(*a, **k):
        raise AssertionError("calibration started for an impossible budget")

    monkeypatch.setattr(mixq.calibset, "calibration_for", refuse)


@pytest.mark.parametrize("bpw, needle", [("0.5", "raise the budget to at least bpw="),
                                         ("100", "more than any plan can use")])
def test_impossible_budget_fails_before_measuring(bpw, needle, tiny_dir, tmp_path, capsys, monkeypatch):
    _no_calibration(monkeypatch)
    assert main(["quantize", "--model", str(tiny_dir), "--bpw", bpw, "--method", "rtn",
                 "--out", str(tmp_path / "q")]) == 2
    line = _one_line(capsys, needle)
    assert "feasible budgets are 2.2" in line and "to 16.0000 bpw" in line, line
    assert os.listdir(tmp_path) == ["tiny"]  # no output, no scratch measurement


def test_feasible_range_known_before_measuring_is_the_measured_one(tiny_dir, tmp_path, capsys, monkeypatch):
    from mixq.allocate import Constraints, SensitivityTable, budget_range, default_candidates, shape_table
    from mixq.arch import iter_layers
    from mixq.models import load_model

    m = tmp_path / "m.json"
    assert main(["measure", "--model", str(tiny_dir), "--nsamples", "2", "--seqlen", "16", "--grad-samples", "1",
                 "--out", str(m)]) == 0
    table = SensitivityTable.load(m)
    model, _ = load_model(str(tiny_dir))
    before = shape_table({r.fqn: r.shape for r in iter_layers(model)}, default_candidates())
    for c in (Constraints(), Constraints(keep=("down_proj",)), Constraints(max_bits={".": 4}),
              Constraints(tied=("(q|k|v)_proj",))):
        assert budget_range(before, c) == budget_range(table, c)
    rng = budget_range(table)
    assert rng.min_bits < rng.max_bits == 16 * table.numel
    capsys.readouterr()
    # mixq plan: every budget checked before any plan is written; the measured minimum is feasible
    assert main(["plan", str(m), "--bpw", f"4,{rng.max_bpw + 0.01:.4f}", "--out", str(tmp_path / "p")]) == 2
    _one_line(capsys, "more than any plan can use")
    assert not (tmp_path / "p").exists()
    assert main(["plan", str(m), "--bpw", f"{rng.min_bpw},{rng.max_bpw}", "--dry-run"]) == 0
    # quantize --bpw with --measurement: checked against the measurement before calibration
    _no_calibration(monkeypatch)
    assert main(["quantize", "--model", str(tiny_dir), "--bpw", "1", "--measurement", str(m),
                 "--out", str(tmp_path / "q")]) == 2
    _one_line(capsys, f"at least bpw={rng.min_bpw:.4f}")


# ---------------------------------------------------------------------------- measurement provenance (item 5)
SMALL = ["--nsamples", "2", "--seqlen", "16", "--grad-samples", "1", "--calib", "ptb"]


@pytest.fixture
def measured(tiny_dir, tmp_path):
    m = tmp_path / "m.json"
    assert main(["measure", "--model", str(tiny_dir), *SMALL, "--out", str(m)]) == 0
    return m


def _quantize_with(tiny_dir, m, out, *extra):
    return main(["quantize", "--model", str(tiny_dir), "--bpw", "4", "--measurement", str(m), "--method", "gptq",
                 *SMALL, *extra, "--out", str(out)])


def test_measurement_without_rotate_is_refused_with_rotate(measured, tiny_dir, tmp_path, capsys, monkeypatch):
    _no_calibration(monkeypatch)
    capsys.readouterr()
    assert _quantize_with(tiny_dir, measured, tmp_path / "q", "--rotate") == 2
    line = _one_line(capsys, "was made without --rotate: drop --rotate")
    assert "mixq plan" not in line and not (tmp_path / "q").exists()


@pytest.mark.parametrize("tamper", ["fingerprint", "other model"])
def test_measurement_of_other_weights_is_refused(tamper, measured, tiny_dir, tiny_model, tiny_tokenizer, tmp_path,
                                                 capsys, monkeypatch):
    import json

    model = tiny_dir
    if tamper == "fingerprint":
        doc = json.loads(measured.read_text())
        doc["meta"]["model"] = "0123456789abcdef"
        measured.write_text(json.dumps(doc))
        needle = "model fingerprint 0123456789abcdef"
    else:
        model = tmp_path / "other"
        tiny_model("llama", seed=1).save_pretrained(model)  # same layers, other weights
        tiny_tokenizer.save_pretrained(model)
        needle = "was made of other weights"
    _no_calibration(monkeypatch)
    capsys.readouterr()
    assert _quantize_with(model, measured, tmp_path / "q") == 2
    line = _one_line(capsys, needle)
    assert "drop --measurement" in line and "mixq plan" not in line, line


def test_measurement_for_other_layers_does_not_say_mixq_plan(measured, tiny_model, tiny_tokenizer, tmp_path, capsys,
                                                             monkeypatch):
    other = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    _no_calibration(monkeypatch)
    capsys.readouterr()
    assert _quantize_with(other, measured, tmp_path / "q") == 2
    line = _one_line(capsys, "was made for another model")
    assert "drop --measurement" in line and "mixq plan" not in line, line


def test_rotated_measurement_is_reused_only_with_rotate(tiny_dir, tmp_path, capsys):
    import json

    first = tmp_path / "q1"
    assert main(["quantize", "--model", str(tiny_dir), "--bpw", "4", "--rotate", "--method", "rtn", *SMALL,
                 "--out", str(first)]) == 0
    m = first / "measurement.json"
    assert json.loads(m.read_text())["meta"]["rotate"] is True
    capsys.readouterr()
    assert _quantize_with(tiny_dir, m, tmp_path / "q2") == 2
    _one_line(capsys, "was made with --rotate: add --rotate")
    assert _quantize_with(tiny_dir, m, tmp_path / "q3", "--rotate") == 0
    assert json.loads((tmp_path / "q3" / "mixq.json").read_text())["rotate"] is True


def test_matching_measurement_is_accepted(measured, tiny_dir, tmp_path):
    assert _quantize_with(tiny_dir, measured, tmp_path / "q") == 0


# ---------------------------------------------------------------------------- signals and stale temporaries (item 6)
_SLOW_WRITER = """
import sys, time
import mixq.export.native_write as native_write
from safetensors.torch import save_file

def slow(tensors, path, *a, **k):  # the final write, caught half-way: rest.safetensors written, mixq.json not
    save_file(tensors, path, *a, **k)
    open(sys.argv[1], "w").close()
    time.sleep(120)

native_write.save_file = slow
from mixq.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _killed_during_write(sig, tiny_dir, out, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    ready = tmp_path / "ready"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(ready), "quantize", "--model", str(tiny_dir),
                             "--spec", "W4-g32", "--method", "rtn", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the writer never started"
            time.sleep(0.1)
        assert [p.name for p in tmp_path.glob(f".{out.name}.tmp-*")], "no temporary while writing?"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ready.unlink()
    return proc.returncode, err, proc.pid, signal


def test_sigterm_during_the_final_write_leaves_nothing(tiny_dir, tmp_path, capsys):
    import signal

    out = tmp_path / "q"
    rc, err, _, _ = _killed_during_write(signal.SIGTERM, tiny_dir, out, tmp_path)
    assert rc == 128 + signal.SIGTERM and "terminated by SIGTERM" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no output, no .q.tmp-*
    assert main(["quantize", "--model", str(tiny_dir), "--spec", "W4-g32", "--method", "rtn", "--out", str(out)]) == 0


def test_sigkill_leftovers_are_removed_by_the_next_run(tiny_dir, tmp_path, capsys):
    import signal

    out = tmp_path / "q"
    rc, _, pid, _ = _killed_during_write(signal.SIGKILL, tiny_dir, out, tmp_path)
    assert rc == -signal.SIGKILL
    left = list(tmp_path.glob(".q.tmp-*"))
    assert len(left) == 1 and left[0].name.startswith(f".q.tmp-{pid}@") and any(left[0].iterdir())
    # a live process's temporary and another output's are not touched
    live = tmp_path / f".q.tmp-{os.getpid()}@{left[0].name.split('@')[1]}"
    live.mkdir()
    other = tmp_path / f".other.tmp-{pid}@{left[0].name.split('@')[1]}"
    other.mkdir()
    assert main(["quantize", "--model", str(tiny_dir), "--spec", "W4-g32", "--method", "rtn", "--out", str(out)]) == 0
    assert not left[0].exists() and live.exists() and other.exists()
    assert (out / "mixq.json").exists()


def test_stale_gguf_temporary_is_removed(qdir, tmp_path):
    import subprocess
    import sys

    from mixq.atomic import temp_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = temp_prefix(tmp_path / "m.gguf").replace(f"-{os.getpid()}@", f"-{dead.pid}@") + "abc123"
    (tmp_path / name).write_bytes(b"half a gguf")
    assert main(["export", str(qdir), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert not (tmp_path / name).exists() and (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------------------- two runs, one --out (item 1)
_HELD_WRITER = """
import os, sys, time
import mixq.calib.checkpoint as ck

orig = ck.WalkCheckpoint.commit

def commit(self, i, *a, **k):  # the walk of the first run, caught half-way until the test releases it
    orig(self, i, *a, **k)
    if i == 0:
        open(sys.argv[1], "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
            time.sleep(0.05)

ck.WalkCheckpoint.commit = commit
from mixq.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("second_spec", ["W4-g32", "W3-g32"])
def test_second_run_on_the_same_out_fails_at_once(second_spec, tiny_dir, tmp_path):
    import subprocess
    import sys
    import time

    from mixq.export.native import load_quantized

    out, ready, release = tmp_path / "q", tmp_path / "ready", tmp_path / "release"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def args(spec):
        return ["quantize", "--model", str(tiny_dir), "--spec", spec, "--method", "gptq", "--nsamples", "2",
                "--seqlen", "16", "--calib", "ptb", "--out", str(out)]

    first = subprocess.Popen([sys.executable, "-c", _HELD_WRITER, str(ready), str(release), *args("W4-g32")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "mixq.cli", *args(second_spec)], env=env,
                                capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run should still be walking"
        assert second.returncode == 2, second.stderr
        assert "is being written by another mixq run (pid %d" % first.pid in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        release.touch()
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    _, _, info = load_quantized(out)  # checksums verified: one run's codes only
    assert info["spec"] == "W4-g32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "ready", "release", "tiny"]  # no lock, walk or temp


def test_a_block_changed_under_the_walk_is_not_assembled(tiny_model, tiny_tokenizer, tmp_path):
    """The released layers of a walk are read back from its block files at save time: each file is checked
    against the size and sha256 the walk recorded, so another writer's block never enters the output."""
    import torch
    from safetensors.torch import load_file, save_file

    from mixq import api
    from mixq.calib.checkpoint import WalkCheckpoint
    from mixq.export.native import load_quantized
    from mixq.export.native_write import save_quantized

    def run(out):
        model = tiny_model("llama")
        ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        walk = WalkCheckpoint(tmp_path / f"walk-{out}", release=True)
        res = api.quantize_model(model, api.resolve_specs(model, "W4-g32"), method="gptq", calib_ids=ids,
                                 progress=False, checkpoint=walk)
        return model, res, walk

    model, res, walk = run("good")
    save_quantized(tmp_path / "good", model, tiny_tokenizer, res.qtensors, {})
    load_quantized(tmp_path / "good")

    model, res, walk = run("bad")
    block = tmp_path / "walk-bad" / "block-00001.safetensors"
    tensors = load_file(block)
    name = next(k for k in tensors if k.endswith(".codes") or tensors[k].dtype == torch.uint8)
    tensors[name] = torch.zeros_like(tensors[name])  # another run's codes, same shapes
    save_file(tensors, block)
    with pytest.raises(ValueError, match="block-00001.safetensors changed after this run wrote it"):
        save_quantized(tmp_path / "bad", model, tiny_tokenizer, res.qtensors, {})
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("command", [
    ["quantize", "--model", "{m}", "--spec", "W4-g32", "--method", "gptq", "--nsamples", "2", "--seqlen", "16",
     "--out", "{t}/q2"],
    ["quantize", "--model", "{m}", "--bpw", "4", "--method", "rtn", "--out", "{t}/q2"],
    ["export", "{q}", "--format", "gguf", "--out", "{t}/m.gguf"],
])
def test_too_little_free_space_fails_before_any_work(command, tiny_dir, qdir, tmp_path, capsys, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    _no_calibration(monkeypatch)
    capsys.readouterr()
    assert main([c.format(m=tiny_dir, q=qdir, t=tmp_path) for c in command]) == 2
    _one_line(capsys, "free: free some space or choose another --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "tiny"]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, 10**9 - 1))  # plenty: the estimate is sane
    if command[0] == "export":
        assert main([c.format(m=tiny_dir, q=qdir, t=tmp_path) for c in command]) == 0


def test_plan_of_other_weights_or_rotation_is_refused(measured, tiny_dir, tiny_model, tiny_tokenizer, tmp_path,
                                                      capsys, monkeypatch):
    import json

    assert main(["plan", str(measured), "--bpw", "4", "--out", str(tmp_path / "p")]) == 0
    p = tmp_path / "p" / "plan-4bpw.json"
    other = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other)  # same layers, other weights
    tiny_tokenizer.save_pretrained(other)
    _no_calibration(monkeypatch)
    capsys.readouterr()
    for model, extra, needle in [(other, [], "was chosen from a measurement of other weights"),
                                 (tiny_dir, ["--rotate"], "was chosen for unrotated weights: drop --rotate")]:
        assert main(["quantize", "--model", str(model), "--plan", str(p), "--method", "gptq", *extra,
                     "--out", str(tmp_path / "q")]) == 2
        line = _one_line(capsys, needle)
        assert "mixq quantize --bpw" in line
    doc = json.loads(p.read_text())
    assert doc["meta"]["rotate"] is False
    monkeypatch.undo()
    assert main(["quantize", "--model", str(tiny_dir), "--plan", str(p), "--method", "rtn",
                 "--out", str(tmp_path / "q")]) == 0


@pytest.mark.skipif(_permissions_bind() or os.geteuid() != 0 or not __import__("shutil").which("setpriv"),
                    reason="needs root and setpriv (elsewhere test_read_only_folder_fails_before_any_work runs)")
def test_read_only_folder_as_root_without_dac_override(tiny_dir, tmp_path):
    """Root as a batch job often runs it, but without CAP_DAC_OVERRIDE (a container, a root-squashed mount):
    a real process, really refused by the kernel."""
    import subprocess
    import sys

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    caps = "-dac_override,-dac_read_search"
    try:
        r = subprocess.run(["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", sys.executable, "-m",
                            "mixq.cli", "quantize", "--model", str(tiny_dir), "--spec", "W4-g32", "--method", "rtn",
                            "--out", str(ro / "q")], env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
                           capture_output=True, text=True, timeout=300)
    finally:
        ro.chmod(0o755)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"mixq: error: --out {ro / 'q'}: cannot write in {ro}")
    assert "Traceback" not in r.stderr and os.listdir(ro) == []


def test_sigterm_during_the_walk_keeps_it_resumable(tiny_dir, tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time

    out, ready, release = tmp_path / "q", tmp_path / "ready", tmp_path / "release"
    args = ["quantize", "--model", str(tiny_dir), "--spec", "W4-g32", "--method", "gptq", "--nsamples", "2",
            "--seqlen", "16", "--calib", "ptb", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", _HELD_WRITER, str(ready), str(release), *args],
                            env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM and "terminated by SIGTERM" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.partial-walk", "ready", "tiny"]
    capsys.readouterr()
    assert main(args) == 0
    assert "resuming the block walk at block 1" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "ready", "tiny"]
