"""The ``medlora`` console entry point: dispatches to the toolkit's commands."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import MedloraError


def _adapters_command(args: argparse.Namespace) -> int:
    from .adapters import describe_method, list_methods
    from .adapters.optim import describe_rule, list_rules

    if args.rules:
        print("\n\n".join(describe_rule(n) for n in list_rules()))
        return 0
    if args.method and args.method not in list_methods():
        raise MedloraError(f"unknown adapter method {args.method!r}; available: {', '.join(list_methods())}")
    names = [args.method] if args.method else list_methods()
    print("\n\n".join(describe_method(n) for n in names))
    return 0


def _phantoms_command(args: argparse.Namespace) -> int:
    from .data.phantoms import write_dataset

    def progress(i: int, n: int, info: dict) -> None:
        print(f"\r  {args.domain} phantoms: {i}/{n}", end="" if i < n else "\n", flush=True)

    out = write_dataset(args.out, args.domain, args.cases, seed=args.seed, overwrite=args.overwrite,
                        progress=progress)
    print(f"wrote {args.cases} {args.domain} cases to {out}")
    return 0


def _crossval_command(args: argparse.Namespace) -> int:
    from .training.crossval import run_crossval

    return run_crossval(args.config, args.out, only=args.only, list_jobs=args.list, workers=args.workers)


def _federate_command(args: argparse.Namespace) -> int:
    try:
        from .federated.federation import run_federate
    except ImportError as exc:  # flwr/opacus are the optional extra `federated`
        raise MedloraError(f"medlora federate needs the federated extra (pip install -e '.[federated]'): "
                           f"{exc}") from None

    return run_federate(args.config, args.out, only=args.only)


def _transfer_command(args: argparse.Namespace) -> int:
    import json

    from .training.transfer import SyntheticSpec, TransferError, run_transfer

    try:
        backbone_args = None if args.backbone_args is None else json.loads(args.backbone_args)
    except json.JSONDecodeError as exc:
        raise TransferError(f"--backbone-args: not JSON ({exc})") from None
    if backbone_args is not None and not isinstance(backbone_args, dict):
        raise TransferError(f"--backbone-args: expected a JSON object, got {args.backbone_args}")
    run_transfer(teacher_model=args.teacher_model, teacher_adapter=args.teacher_adapter, model=args.model,
                 out=args.out, method=args.method, rank=args.rank, alpha=args.alpha, backbone=args.backbone,
                 backbone_args=backbone_args, seed_cases=args.seed_cases, steps=args.steps,
                 batch_size=args.batch_size, lr=args.lr, synthetic=SyntheticSpec(
                     volumes=args.synthetic_volumes, shape=None if args.synthetic_shape is None else
                     tuple(args.synthetic_shape), spacing=None if args.synthetic_spacing is None else
                     tuple(args.synthetic_spacing)),
                 temperature=args.temperature, lesion_weight=args.lesion_weight, dice_weight=args.dice_weight,
                 seed=args.seed, overwrite=args.overwrite)
    return 0


def _report_command(args: argparse.Namespace) -> int:
    from .evaluation.report import build_report

    print(f"report: {build_report(args.run_dir)}")
    return 0


def _infer_command(args: argparse.Namespace) -> int:
    from .inference import run_inference

    summary = run_inference(
        args.model, args.inputs, args.out, adapters=args.adapter or (), method=args.method,
        sw_batch_size=args.sw_batch_size, overlap=args.sw_overlap, device=args.device, threshold=args.threshold,
        roi_size=args.roi_size, save_probabilities=args.save_probabilities, overlay=args.overlay,
        overwrite=args.overwrite,
    )
    return summary.exit_code


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class _Renamed(argparse.Action):
    """An option that was renamed: one line naming the new one (``--overlap`` is ``--sw-overlap`` now, the name
    of ``model.sw_overlap`` in fit configs)."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        raise MedloraError(f"{option_string}: renamed to {self.new}")


def build_parser() -> argparse.ArgumentParser:
    from .evaluation.predict import DEFAULT_SW_BATCH_SIZE, DEFAULT_SW_OVERLAP

    parser = argparse.ArgumentParser(
        prog="medlora",
        description="Parameter-efficient transfer learning (LoRA, DoRA, CP-LoRA, SALT ...) for CT segmentation.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"medlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("adapters", help="list the adapter methods and their options")
    p.add_argument("method", nargs="?", help="describe only this method")
    p.add_argument("--rules", action="store_true", help="list the training rules (model.training_rule) instead")
    p.set_defaults(func=_adapters_command)

    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (see `medlora {name} --help`; --config configs/*.yaml)",
                       add_help=False)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    p = data.add_parser("phantoms", help="write synthetic head-CT phantoms in nnU-Net v2 layout")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--domain", choices=("tbi", "sah"), required=True,
                   help="tbi: source domain (contusions, subdural, epidural); sah: target domain (cisterns, sulci)")
    p.add_argument("--cases", type=int, default=20, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives bitwise identical files")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already in --out")
    p.set_defaults(func=_phantoms_command)

    p = sub.add_parser("crossval", help="k-fold cross-validated transfer study (resumable; one folder per job)")
    p.add_argument("--config", required=True, help="study YAML, e.g. configs/study/sah_transfer.yaml")
    p.add_argument("--out", required=True, help="run folder (created; re-running resumes)")
    p.add_argument("--only", help="run only matching jobs: keys job, method, rank, fold, family, seed, train_cases, "
                   "e.g. method=cp_lora,rank=4,seed=1; or 'pretrain'")
    p.add_argument("--list", action="store_true", help="print the jobs (for a scheduler) and exit")
    p.add_argument("--workers", type=int, default=1,
                   help="jobs to run at once in separate processes (they share the CPU threads / the GPU)")
    p.set_defaults(func=_crossval_command)

    p = sub.add_parser("federate", help="federated adapter fine-tuning across sites on Flower (resumable)")
    p.add_argument("--config", required=True, help="federation YAML, e.g. configs/federated/sah_sites.yaml")
    p.add_argument("--out", required=True, help="run folder (created; re-running resumes)")
    p.add_argument("--only", help="run only this strategy, or 'baselines' (the report needs a full run)")
    p.set_defaults(func=_federate_command)

    p = sub.add_parser("transfer", help="move an adapter to a new base by distillation on synthetic phantoms "
                       "(Trans-LoRA; no patient data)")
    p.add_argument("--teacher-model", required=True, help="the old base weights the teacher adapter was trained on")
    p.add_argument("--teacher-adapter", required=True, help="the old adapter file (written by fit/crossval)")
    p.add_argument("--model", required=True, help="the new base weights")
    p.add_argument("--backbone", help="the new base's backbone (default: the teacher's)")
    p.add_argument("--backbone-args", metavar="JSON",
                   help='the new base\'s backbone arguments, e.g. \'{"level": 2, "width": 16}\' '
                   "(default: the teacher's)")
    p.add_argument("--method", required=True, help="adapter method of the new adapter (medlora adapters)")
    p.add_argument("--rank", type=int, default=4, help="its rank (default 4)")
    p.add_argument("--alpha", type=float, help="its alpha (default: the method's)")
    p.add_argument("--out", required=True, help="the new adapter file (refused if it exists, unless --overwrite)")
    p.add_argument("--seed-cases", metavar="DIR",
                   help="a few real cases (NIfTI or an nnU-Net dataset): train the discriminator filter")
    p.add_argument("--steps", type=int, default=200, help="distillation steps (default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step (default 8)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3)")
    p.add_argument("--synthetic-volumes", type=int, default=24, help="phantom volumes generated (default 24)")
    p.add_argument("--synthetic-shape", type=int, nargs=3, metavar="N",
                   help="phantom grid in voxels (default: the seed cases' grid, else 96 96 32)")
    p.add_argument("--synthetic-spacing", type=float, nargs=3, metavar="MM",
                   help="phantom voxel size in mm (default: the seed cases', else 2 2 5)")
    p.add_argument("--temperature", type=float, default=2.0, help="KL temperature T (default 2)")
    p.add_argument("--lesion-weight", type=float, default=5.0, help="KL weight of teacher-lesion voxels (default 5)")
    p.add_argument("--dice-weight", type=float, default=1.0, help="weight of the Dice term (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_transfer_command)

    p = sub.add_parser("report", help="rebuild report.md, results.csv and plots of a crossval run folder")
    p.add_argument("run_dir", help="the --out folder of medlora crossval")
    p.set_defaults(func=_report_command)

    p = sub.add_parser("infer", help="segment NIfTI/DICOM volumes; labels in the input's geometry, volumes in mL")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="NIfTI files, folders of them (nnU-Net imagesTs names) or DICOM series folders")
    p.add_argument("--model", required=True,
                   help="Lightning checkpoint, base weights (with --adapter) or a crossval run folder (with --method)")
    p.add_argument("--adapter", action="append", metavar="ADAPTER",
                   help="adapter file (repeat for an ensemble: one model per adapter, probabilities averaged)")
    p.add_argument("--method", metavar="JOB", help="crossval job whose fold models form the ensemble, e.g. cp_dora_r4")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--sw-batch-size", type=int, default=DEFAULT_SW_BATCH_SIZE,
                   help=f"sliding windows per network call (default {DEFAULT_SW_BATCH_SIZE}; model.sw_batch_size)")
    p.add_argument("--sw-overlap", type=float, default=DEFAULT_SW_OVERLAP,
                   help=f"sliding-window overlap (default {DEFAULT_SW_OVERLAP}, as validation; model.sw_overlap)")
    p.add_argument("--overlap", action=_Renamed, new="--sw-overlap")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto; bf16 autocast on CUDA")
    p.add_argument("--threshold", type=float, help="probability threshold (default: the model's recorded one)")
    p.add_argument("--roi-size", type=int, nargs="+", metavar="N",
                   help="sliding-window size (default: the recorded model.roi_size, else the training patch size)")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>_prob.nii.gz (float32)")
    p.add_argument("--overlay", action="store_true", help="also write <case>_overlay.png (a few axial slices)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (default: a case whose outputs exist is skipped and counted failed)")
    p.set_defaults(func=_infer_command)

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            from .training.cli import run

            return run(argv)
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except (MedloraError, FileExistsError) as exc:
        print(f"medlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (what to do next, if the command says) and 128 + SIGINT
        print(f"medlora: interrupted{'; ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
