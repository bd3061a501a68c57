"""Where the model lives while ``measure`` and ``quantize`` work on it: ``--device`` or accelerate's placement
(``--device-map``, ``--max-memory``, ``--offload-folder``)."""
from __future__ import annotations

from pathlib import Path

from ..calib.dispatch import NAMED_DEVICE_MAPS
from .common import UserError, one_line


def placement_args(p, verb: str) -> None:
    """``--device``, ``--device-map``, ``--max-memory``, ``--offload-folder`` on the parser ``p``; ``verb``: what is
    done there (``"measured"``)."""
    p.add_argument("--device", default="cpu",
                   help=f"where the model is loaded and {verb}: cpu (default), cuda, cuda:N; under torchrun "
                        "(measure), cuda means the first of each process's GPUs (NCCL), cpu uses gloo")
    p.add_argument("--device-map", default=None,
                   help=f"spread the model with accelerate instead of --device: {', '.join(NAMED_DEVICE_MAPS)}, or a "
                        "JSON file {module: device} (GPU index, cpu, disk); blocks that fit nowhere are offloaded and "
                        "materialized one at a time by the walk (see README, 'Several devices and processes')")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB; gpu=SIZE is every "
                        "GPU; under torchrun, each process's own GPUs (the node's GPUs split evenly among its "
                        "processes), and then required")
    p.add_argument("--offload-folder", default=None, help="with --device-map: where weights offloaded to disk go")


def check_device(device: str) -> None:
    """Refuse a ``--device`` this machine does not have, naming what it has."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r}: {one_line(e)} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise UserError(f"--device {device}: this machine has {n} CUDA device(s); use --device cpu"
                            + (f" or cuda:0..cuda:{n - 1}" if n else ""))
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: only cpu and cuda devices are supported")


def placement_from(args, group=None):
    """accelerate's placement from ``--device-map``, ``--max-memory`` and ``--offload-folder`` (``None``: --device);
    ``group``: the measuring processes under torchrun (None: this process alone)."""
    import json

    from ..calib.dispatch import Placement, parse_max_memory
    from ..measure.distributed import local_gpus

    if not args.device_map:
        if args.max_memory or args.offload_folder:
            raise UserError("--max-memory and --offload-folder go with --device-map")
        return None
    dm = args.device_map
    if dm not in NAMED_DEVICE_MAPS:
        try:
            dm = json.loads(Path(dm).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--device-map {args.device_map!r}: not {'/'.join(NAMED_DEVICE_MAPS)} nor a readable "
                            f"JSON file ({one_line(e)})") from None
    import torch

    gpus = local_gpus(torch.cuda.device_count()) if group is not None and group.world > 1 else None
    try:
        mem = parse_max_memory(args.max_memory, gpus)
    except ValueError as e:
        raise UserError(str(e)) from None
    if gpus is not None and isinstance(dm, str):
        if not mem or any(k not in gpus for k in mem if isinstance(k, int)) or not any(k in gpus for k in mem):
            raise UserError(f"under torchrun, --device-map needs --max-memory gpu=SIZE: this process's GPUs are "
                            f"{gpus} and a string device map must not reach the others'")
    return Placement(dm, mem, args.offload_folder)
