"""The ``medlora`` console entry point: dispatches to the toolkit's commands."""

from __future__ import annotations

import argparse
import os
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

    if args.types and args.domain != "ich":
        raise MedloraError(f"--types: only --domain ich writes multi-class labels, not --domain {args.domain}")
    try:
        out = write_dataset(args.out, args.domain, args.cases, seed=args.seed, overwrite=args.overwrite,
                            types=args.types or None, progress=progress)
    except ValueError as exc:
        raise MedloraError(str(exc)) from None
    print(f"wrote {args.cases} {args.domain} cases to {out}")
    return 0


def _crossval_command(args: argparse.Namespace) -> int:
    from .training.crossval import run_crossval

    return run_crossval(args.config, args.out, only=args.only, list_jobs=args.list, workers=args.workers,
                        pack=args.pack, launcher=args.launcher, ray_address=args.ray_address)


def _compose_command(args: argparse.Namespace) -> int:
    from .training.composition import read_compose_config, run_composition_study

    settings = read_compose_config(args.config) if args.config else {}
    given = {k: getattr(args, k) for k in ("types", "train_cases", "test_cases", "few_cases", "seed", "base_steps",
                                           "adapter_steps", "budget", "rloo_steps")}
    settings.update({k: v for k, v in given.items() if v is not None})
    run_composition_study(args.out, **settings)
    return 0


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
                 seed=args.seed, overwrite=args.overwrite, finetune=args.finetune)
    return 0


def _report_command(args: argparse.Namespace) -> int:
    from .evaluation.report import build_report

    print(f"report: {build_report(args.run_dir)}")
    return 0


def _infer_command(args: argparse.Namespace) -> int:
    from .inference import run_inference

    summary = run_inference(
        args.model, args.inputs, args.out, adapters=args.adapter or (), method=args.method,
        composition=args.composition,
        sw_batch_size=args.sw_batch_size, overlap=args.sw_overlap, device=args.device, threshold=args.threshold,
        roi_size=args.roi_size, save_probabilities=args.save_probabilities, overlay=args.overlay,
        overwrite=args.overwrite,
    )
    return summary.exit_code


def _prune_command(args: argparse.Namespace) -> int:
    from .pruning.files import run_prune
    from .training.transfer import SyntheticSpec

    synthetic = SyntheticSpec(volumes=args.align_volumes,
                              shape=None if args.align_shape is None else tuple(args.align_shape),
                              spacing=None if args.align_spacing is None else tuple(args.align_spacing))
    done = run_prune(args.model, args.adapter, args.out, sparsity=args.sparsity, merge=not args.no_merge,
                     overwrite=args.overwrite, align_steps=args.align_steps, align_synthetic=synthetic,
                     align_lr=args.align_lr)
    aligned = done["aligned"]
    print(f"pruned base: {done['out']} ({done['parameters_before']:,} -> {done['parameters_after']:,} parameters, "
          f"{done['groups']} channel groups{', adapter merged' if done['merged'] else ''}"
          + (f", aligned {aligned['steps']} steps: distillation loss {aligned['first_loss']:.4f} -> "
             f"{aligned['last_loss']:.4f}" if aligned else "") + ")")
    return 0


def _recover_command(args: argparse.Namespace) -> int:
    from .pruning.files import run_recover

    done = run_recover(args.model, args.adapter, args.out, merged_out=args.merged_out, overwrite=args.overwrite)
    print(f"recovered adapter: {done['out']} ({done['layers']} layers)"
          + (f"; merged base: {done['merged_out']}" if done["merged_out"] else ""))
    return 0


def _serve_command(args: argparse.Namespace) -> int:
    try:
        from .serving.server import run_server
    except ImportError as exc:  # litserve is the optional extra `serve`
        raise MedloraError(f"medlora serve needs the serve extra (pip install -e '.[serve]'): {exc}") from None

    return run_server(args.model, args.adapters, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                      batch_timeout=args.batch_timeout, cache_size=args.cache_size, device=args.device,
                      sw_batch_size=args.sw_batch_size, overlap=args.sw_overlap, mode=args.mode,
                      request_timeout=args.request_timeout)


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
_COMPOSE_TYPES = ("sah", "ivh", "iph", "sdh", "sah+ivh", "iph+sdh")  # medlora.training.composition.DEFAULT_TYPES


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
    p.add_argument("--domain", choices=("tbi", "sah", "ich"), required=True,
                   help="tbi: source domain (contusions, subdural, epidural); sah: target domain (cisterns, sulci); "
                   "ich: multi-class labels by hemorrhage type")
    p.add_argument("--types", nargs="+", metavar="GROUP",
                   help="ich only: the type mix, one group per case cycled, '+' joins types of one case, e.g. "
                   "sah ivh sah+ivh iph+sdh (default: the five types, one per case)")
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
    p.add_argument("--pack", type=int, default=1, metavar="K",
                   help="train up to K jobs of one base in one process, one forward/backward per step for all K")
    p.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="ray: every job (or pack) is a Ray task (pip install 'medlora[ray]')")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="an existing Ray cluster (e.g. ray://head:10001); default: a local Ray with --workers CPUs")
    p.set_defaults(func=_crossval_command)

    p = sub.add_parser("compose", help="single-class adapters composed at the output vs merged (LoraHub-style) vs "
                       "their controls, on a multi-class phantom cohort")
    p.add_argument("--out", required=True, help="output folder (composition.md, composition.json, adapters/)")
    p.add_argument("--config", help="YAML preset of the settings below (e.g. configs/study/ich_composition.yaml); "
                   "options given here override it")
    p.add_argument("--types", nargs="+", metavar="GROUP",
                   help=f"type groups of the cohort, as data phantoms --types (default: {' '.join(_COMPOSE_TYPES)})")
    p.add_argument("--train-cases", type=int, help="default 12")
    p.add_argument("--test-cases", type=int, help="default 8")
    p.add_argument("--few-cases", type=int, help="labelled cases per class the merges are fitted on (default 3)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--base-steps", type=int, help="default 200")
    p.add_argument("--adapter-steps", type=int, help="default 100")
    p.add_argument("--budget", type=int, help="objective evaluations of each coefficient search (default 40)")
    p.add_argument("--rloo-steps", type=int, help="RLOO training steps of each ReMix-style router (default 200)")
    p.set_defaults(func=_compose_command)

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
    p.add_argument("--finetune", metavar="GROUP", help="module group of the new base trained beside the adapter, "
                   "e.g. mask_decoder (default: the teacher's recorded finetune; 'none': the adapter alone)")
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
    p.add_argument("--composition", "--router", metavar="FILE",
                   help="composition file (medlora compose): its adapters routed and fused into one multi-class "
                   "label map (adapters found beside it unless given with --adapter)")
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

    p = sub.add_parser("prune", help="LoRAPrune: write a channel-pruned base from an adapter trained with LoRAPrune")
    p.add_argument("--model", required=True, help="the full base weights the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter file holding a LoRAPrune record (importance, masks)")
    p.add_argument("--sparsity", type=float, help="share of units removed per channel group, in [0, 1) "
                   "(default: the sparsity the adapter was trained to, with its masks)")
    p.add_argument("--no-merge", action="store_true", help="prune W0 only, without the adapter (a base for LoRAM)")
    p.add_argument("--align-steps", type=int, default=0, help="LoRAM alignment: distil the pruned base towards the "
                   "unpruned one for this many steps on synthetic phantoms (default 0: no alignment)")
    p.add_argument("--align-volumes", type=int, default=16, help="phantom volumes for the alignment (default 16)")
    p.add_argument("--align-shape", type=int, nargs=3, metavar="N",
                   help="phantom grid for the alignment (default 96 96 32; use the training data's)")
    p.add_argument("--align-spacing", type=float, nargs=3, metavar="MM",
                   help="phantom voxel size in mm for the alignment (default 2 2 5)")
    p.add_argument("--align-lr", type=float, default=1e-3, help="Adam learning rate of the alignment (default 1e-3)")
    p.add_argument("--out", required=True, help="pruned base to write (.safetensors, with its model record)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_prune_command)

    p = sub.add_parser("recover", help="LoRAM: recover an adapter trained on a pruned base for the full base")
    p.add_argument("--model", required=True, help="the full base the pruned base was made from")
    p.add_argument("--adapter", required=True, help="adapter trained on the pruned base")
    p.add_argument("--out", required=True, help="adapter file for the full base to write")
    p.add_argument("--merged-out", help="also write the full base with the recovered adapter merged")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_recover_command)


    p = sub.add_parser("serve", help="HTTP segmentation server: one base, many adapters, mixed-adapter batches "
                       "(LitServe; docs/serving.md)")
    p.add_argument("--model", required=True, help="base weights (.safetensors/.pt) or a Lightning checkpoint of it")
    p.add_argument("--adapters", required=True, metavar="DIR",
                   help="folder of adapter files: NAME.safetensors or NAME/adapter.safetensors, loaded on demand")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default, this machine only), 0.0.0.0 or ::")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests segmented together (default 8)")
    p.add_argument("--batch-timeout", type=float, default=0.05,
                   help="seconds to wait for a batch to fill (default 0.05)")
    p.add_argument("--cache-size", type=int, default=8, help="adapters kept loaded, least recently used evicted")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="cpu (default), cuda or auto")
    p.add_argument("--sw-batch-size", type=int, default=DEFAULT_SW_BATCH_SIZE,
                   help=f"sliding windows per request and network call (default {DEFAULT_SW_BATCH_SIZE})")
    p.add_argument("--sw-overlap", type=float, default=DEFAULT_SW_OVERLAP,
                   help=f"sliding-window overlap (default {DEFAULT_SW_OVERLAP})")
    p.add_argument("--mode", default="mixed", choices=("mixed", "merged", "per-request"),
                   help="mixed (default): one mixed-adapter batch; merged / per-request: for comparison")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may wait in the queue (default 600)")
    p.set_defaults(func=_serve_command)

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
            sys.stdout.flush()
            return 0
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a block-buffered pipe is written here, inside the handler below, not at interpreter exit
        return code
    except (MedloraError, FileExistsError) as exc:
        print(f"medlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (what to do next, if the command says) and 128 + SIGINT
        print(f"medlora: interrupted{'; ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `medlora adapters | head`: the reader left; no traceback, 128 + SIGPIPE as a shell would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush cannot fail
        return 141


if __name__ == "__main__":
    sys.exit(main())
