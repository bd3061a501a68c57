"""``mixq measure-kv``: every attention layer's K and V sensitivity to KV-cache bits (KIVI), for
``mixq plan --memory``."""
from __future__ import annotations

import time
from pathlib import Path

from ..runtime.kv_codec import ROTATE_CHOICES, ZERO_CHOICES
from ..measure.kv import KV_CANDIDATE_BITS, measure_kv
from ..runtime.kv_settings import KVSettings
from ..allocate.kv_table import KV_METRICS
from ..runtime.kv_sim import KV_ENGINES
from .common import UserError, calib_args, check_full_attention, check_positive, model_arg, one_line


def register(sub) -> None:
    m = sub.add_parser("measure-kv", help="measure every layer's K and V sensitivity to KV-cache bits (KIVI)",
                       description="For each attention layer and each of K and V, quantize only that tensor's cache "
                                   "at each width and record the KL to the fp model (nats per token) on calibration "
                                   "windows.  Resumes from OUT.partial.")
    model_arg(m)
    calib_args(m, nsamples=2)
    bits = ",".join(map(str, KV_CANDIDATE_BITS))
    m.add_argument("--bits", default=bits, help=f"KV widths to measure (default {bits}; 16 is always free)")
    m.add_argument("--metric", default="kl", choices=KV_METRICS, help="kl (default) or loss increase")
    m.add_argument("--engine", default="simulate", choices=KV_ENGINES,
                   help="simulate (one forward per candidate, default) or the real cache chunk by chunk")
    m.add_argument("--chunk", type=int, default=1, help="decode tokens per forward the errors assume (default 1)")
    m.add_argument("--prefill", type=int, default=None, help="prefill tokens (default --chunk)")
    m.add_argument("--residual", type=int, default=32, help="fp window of recent tokens (default 32)")
    m.add_argument("--k-group", type=int, default=32, help="tokens per key group (default 32)")
    m.add_argument("--v-group", type=int, default=None, help="channels per value group (default head_dim)")
    m.add_argument("--zero", default="fp16", choices=ZERO_CHOICES, help="fp16 offset (KIVI) or int zero point")
    m.add_argument("--important", type=float, default=0.0, help="MiKV: fraction of each key group's tokens (the "
                                                                "most attended) kept at --important-bits (default 0: off)")
    m.add_argument("--important-bits", type=int, default=8, help="bits of the important tokens (default 8; 16 = fp)")
    m.add_argument("--pre-rope", action="store_true", help="quantize keys before the rotary embedding (KVQuant)")
    m.add_argument("--rotate", default="", choices=ROTATE_CHOICES, help="Hadamard-rotate K, V or both first")
    m.add_argument("--batch-size", type=int, default=2, help="calibration windows per forward (default 2)")
    m.add_argument("--out", required=True, help="KV measurement JSON to write")
    m.add_argument("--force", action="store_true", help="replace --out if it exists")
    m.set_defaults(func=cmd_measure_kv)


def cmd_measure_kv(args) -> int:
    from ..bos import resolve_bos
    from ..calibset import build_calibration, parse_sources
    from ..models import load_model

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists: choose another --out or pass --force")
    check_positive(nsamples=args.nsamples, chunk=args.chunk, prefill=args.prefill, batch_size=args.batch_size)
    if args.seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {args.seqlen}")
    try:
        bits = [int(b) for b in args.bits.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--bits {args.bits!r}: expected comma-separated integers, e.g. 2,3,4,8") from None
    try:
        settings = KVSettings(k_group=args.k_group, v_group=args.v_group, residual=args.residual, zero=args.zero,
                              important=args.important, important_bits=args.important_bits, pre_rope=args.pre_rope,
                              rotate=args.rotate)
    except ValueError as e:
        raise UserError(f"measure-kv: {one_line(e)}") from None
    parse_sources(args.calib)
    model, tok = load_model(args.model)
    check_full_attention(model)
    cset = build_calibration(model, tok, args.calib, args.nsamples, args.seqlen, args.seed,
                             bos_id=resolve_bos(tok, model, args.bos).bos_id, progress=False)
    calib = cset.ids
    t0 = time.perf_counter()
    table = measure_kv(model, calib, bits=bits, metric=args.metric, settings=settings, engine=args.engine,
                       chunk=args.chunk, prefill=args.prefill, batch_size=args.batch_size, out=out,
                       progress=args.verbose > 0)
    table.meta.update(model_name=args.model, calib=cset.record())
    table.save(out, overwrite=True)
    print(table.format())
    print(f"wrote {out}: {table.n_layers} layers × K/V × {len(table.bits) - 1} widths ({table.metric}, nats/token, "
          f"engine {args.engine}, chunk {args.chunk}), {time.perf_counter() - t0:.1f} s")
    return 0
