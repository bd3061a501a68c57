"""``mixq finetune DIR --out OUT``: block-wise distillation of a quantized directory's scales, codes fixed."""
from __future__ import annotations

from .common import UserError, calib_args, check_positive, claim_output, e2e_amp_arg


def register(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune a quantized directory's scales and norms (codes fixed)",
                       description="Train the continuous parameters of DIR (group scales, fp16 offsets, norm "
                                   "weights) block by block towards its base model on calibration text, keep each "
                                   "block's best epoch on held-out rows, and write OUT.  Resumes when interrupted.")
    f.add_argument("dir", help="a mixq directory (from `mixq quantize`)")
    calib_args(f, nsamples=32)
    f.add_argument("--epochs", type=int, default=2, help="passes over the training rows per block (default 2)")
    f.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the log-scales (default 1e-2)")
    f.add_argument("--norm-lr", type=float, default=1e-4, help="Adam learning rate of norm weights (default 1e-4)")
    f.add_argument("--batch", type=int, default=2, help="calibration rows per step (default 2)")
    f.add_argument("--val-frac", type=float, default=0.25,
                   help="share of the calibration rows held out to choose each block's epoch (default 0.25)")
    f.add_argument("--no-norms", action="store_true", help="train the scales only")
    f.add_argument("--e2e-epochs", type=int, default=1,
                   help="then passes of end-to-end distillation on the base model's logits, all blocks at once "
                        "(0: block-wise only; default 1)")
    f.add_argument("--e2e-lr", type=float, default=1e-3, help="Adam learning rate of the end-to-end stage (default 1e-3)")
    e2e_amp_arg(f)
    f.add_argument("--no-plot", action="store_true", help="do not write OUT/finetune.png")
    f.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    f.add_argument("--force", action="store_true", help="replace --out if it exists")
    f.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from ..distill import FinetuneConfig
    from ..distill_e2e import E2EConfig
    from ..pipeline import finetune

    check_positive(nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs, batch=args.batch)
    if args.e2e_epochs < 0:
        raise UserError(f"--e2e-epochs must be >= 0 (0 skips the end-to-end stage), got {args.e2e_epochs}")
    claim_output(args.out, args.force)
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, norm_lr=args.norm_lr, batch=args.batch,
                         val_frac=args.val_frac, tune_norms=not args.no_norms, seed=args.seed)
    e2e = None if args.e2e_epochs == 0 else E2EConfig(epochs=args.e2e_epochs, lr=args.e2e_lr, batch=args.batch,
                                                          val_frac=args.val_frac, tune_norms=not args.no_norms,
                                                          seed=args.seed, amp=args.e2e_amp)
    rep = finetune(args.dir, args.out, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                   bos=args.bos, config=cfg, e2e=e2e, overwrite=args.force, plot=not args.no_plot)
    kept = sum(b["epoch_kept"] > 0 for b in rep["blocks"])
    print(f"wrote {args.out}: {kept} of {len(rep['blocks'])} blocks changed, held-out block loss x"
          f"{rep['held_out_gain']:.3f} (geometric mean), {rep['seconds']:.0f} s"
          + (f"; curves in {rep['plot']}" if rep.get("plot") else ""))
    if "e2e" in rep:
        e = rep["e2e"]
        print(f"end-to-end: held-out KL {e['held_out_before']:.4f} -> {e['held_out_after']:.4f} "
              f"(epoch {e['epoch_kept']} kept), {e['seconds']:.0f} s")
    return 0
