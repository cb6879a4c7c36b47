"""The ``medlora`` console entry point: dispatches to the toolkit's commands."""

from __future__ import annotations

import argparse
import sys


def _adapters_command(args: argparse.Namespace) -> int:
    from .adapters import describe_method, list_methods

    names = [args.method] if args.method else list_methods()
    print("\n\n".join(describe_method(n) for n in names))
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medlora",
        description="Parameter-efficient transfer learning (LoRA, DoRA, CP-LoRA, SALT ...) for CT segmentation.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"medlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("adapters", help="list the adapter methods and their options")
    p.add_argument("method", nargs="?", help="describe only this method")
    p.set_defaults(func=_adapters_command)

    p = sub.add_parser("demo", help="adapt a pretrained 3D multi-view UNet to a shifted domain (about a minute)")
    p.add_argument("--pretrain-steps", type=int, default=120)
    p.add_argument("--finetune-steps", type=int, default=50)
    p.set_defaults(func=_demo_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
