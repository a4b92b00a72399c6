"""The `tinylm` command: train, sample, explain, export and download.

Only argument parsing and friendly errors live here: a `UserError` from anywhere below becomes one
`error: ...` line on stderr and exit status 2, never a traceback.

    tinylm train [--config NAME_OR_FILE] [--data PATH ...] [--run_dir DIR] [--resume RUN_DIR] [--init_from HF_DIR]
                 [--plan auto|off]
                 [--section.field=VALUE ...]       (tinylm train --help lists every setting and recipe)
    tinylm sample RUN_DIR [--prompt TEXT] [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P]
                  [--seed S] [--num_samples N] [--show_probs] [-i]
    tinylm export RUN_DIR OUT_DIR [--force]          a Hugging Face transformers folder
    tinylm download NAME [--dir DIR] [--mirror URL]  a classic corpus into data/ (--list shows them)
    tinylm explain [RUN_DIR] [--neighbors TOKEN ...] the one-neuron lesson, then the model's weights and biases
    tinylm explain RUN_DIR --compare A B             what training changed between the snapshots of steps A and B
    tinylm --version
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tinylm.errors import UserError, shown

RANK_ERROR_WAIT = 5.0  # seconds a process other than rank 0 waits before reporting an error


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a UserError (one line) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see '{self.prog} --help')")


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Pull `--section.field=value` and `--section.field value` out of argv."""
    from tinylm.configfile import parse_override_value

    rest: list[str] = []
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in key:
            if "=" in arg:
                overrides[key] = parse_override_value(arg.split("=", 1)[1])
            elif i + 1 < len(argv):
                overrides[key] = parse_override_value(argv[i + 1])
                i += 1
            else:
                raise UserError(f"{arg} needs a value: {arg}=VALUE")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def cmd_train(argv: list[str]) -> int:
    from tinylm import confdoc

    rest, overrides = split_overrides(argv)
    # The settings (--section.field=VALUE) are taken out of argv above; the epilog documents them and the recipes.
    width = min(max(shutil.get_terminal_size().columns - 2, 60), 120)
    p = _Parser(prog="tinylm train", description="Train a tokenizer and a transformer on text.",
                epilog=confdoc.help_text(width), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="NAME_OR_FILE",
                   help="a recipe's name (listed below) or a YAML file of settings; default: the built-in defaults")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files, folders or datasets, as data.paths below (default: the built-in corpus)")
    p.add_argument("--run_dir", help="where to write the run (default: runs/<config name>, numbered if taken)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--init_from", metavar="DIR", help="fine-tune a GPT-2 or Llama folder (transformers' "
                   "save_pretrained): its weights, shape and tokenizer (same as --train.init_from=DIR)")
    p.add_argument("--plan", choices=("auto", "off"), help="auto (the default): choose the model's size, batch, "
                   "dropout and warmup from the budget, the corpus and this machine (docs/planner.md); off: the "
                   "fixed defaults (same as --train.plan=VALUE)")
    args = p.parse_args(rest)
    if args.plan:
        overrides["train.plan"] = args.plan
    if args.data:
        overrides["data.paths"] = args.data
    if args.init_from:
        overrides["train.init_from"] = args.init_from
    from tinylm import rundir

    cfg = rundir.settings(args.config, overrides, resume_dir=args.resume)  # checked before torch is loaded
    if args.run_dir is not None and not args.resume:
        rundir.claim(args.run_dir, resume=False)  # so is the folder (tinylm.start checks again, for the Python API)
    name = rundir.run_name(args.config, args.data or [])
    from tinylm.loop import train

    result = train(cfg, run_dir=args.resume or args.run_dir, resume=bool(args.resume), name=name)
    # Stopped by a signal: the shell's convention, 128 + its number (130 for Ctrl-C, 143 for SIGTERM).
    return 128 + result.signal if result.interrupted else 0


def cmd_sample(argv: list[str]) -> int:
    p = _Parser(prog="tinylm sample", description="Stream text generated by a trained run.")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max_new_tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = always the most likely token")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="sample among the most likely tokens holding probability p")
    p.add_argument("--seed", type=int, default=None, help="fix the random choices (same seed, same text)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--show_probs", action="store_true",
                   help="each token with the probability it was drawn with and its top alternatives")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="keep the model loaded and continue each line typed (or read from stdin)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise UserError(f"--seed must be between -2**63 and 2**64 - 1, got {shown(args.seed)}")
    from tinylm.config import check_device

    check_device(args.device, "--device")  # before torch is loaded
    from tinylm.generate import check_options

    check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p, flag="--")

    import torch

    from tinylm import rundir
    from tinylm.generate import stream_text
    from tinylm.hardware import pick_device

    device = pick_device(args.device, flag="--device")
    _, tok, model, _ = rundir.load(args.run_dir, device)
    gen = torch.Generator(device=device)
    if args.seed is None:
        gen.seed()
    else:
        gen.manual_seed(args.seed)
    if args.interactive:
        from tinylm.sampling import interactive

        interactive(model, tok, sys.stdin, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                    device, probs=args.show_probs)
        return 0
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        if args.show_probs:
            from tinylm.sampling import show_probs

            show_probs(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, gen)
            continue
        print(args.prompt, end="", flush=True)
        for piece in stream_text(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                 args.top_p, gen):
            print(piece, end="", flush=True)
        print(flush=True)
    return 0


def cmd_export(argv: list[str]) -> int:
    p = _Parser(prog="tinylm export", description="Write a trained run as a Hugging Face transformers model folder.")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--force", action="store_true", help="overwrite an earlier export in OUT_DIR")
    args = p.parse_args(argv)
    if not args.out_dir:  # Path("") is the current folder, which is no place to scatter an export's files
        raise UserError("OUT_DIR is empty; name a folder for the export")
    from tinylm.export import export

    export(args.run_dir, args.out_dir, force=args.force)
    return 0


def cmd_download(argv: list[str]) -> int:
    from tinylm import download

    p = _Parser(prog="tinylm download", description="Download a classic text corpus, checksum verified.",
                epilog="corpora:\n" + download.listing(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help=f"one of {', '.join(download.CORPORA)}")
    p.add_argument("--dir", default="data", help="where to write it (default: data)")
    p.add_argument("--mirror", metavar="URL", help="fetch the same files from this base URL instead")
    p.add_argument("--list", action="store_true", help="list the corpora")
    args = p.parse_args(argv)
    if args.list:
        print(download.listing())
        return 0
    if not args.name:
        raise UserError(f"name a corpus: {', '.join(download.CORPORA)} (tinylm download --list describes them)")
    download.download(args.name, args.dir, mirror=args.mirror)
    return 0


def cmd_explain(argv: list[str]) -> int:
    p = _Parser(prog="tinylm explain",
                description="A neuron's y = w*x + b computed by PyTorch, then the real model's weights and biases.")
    p.add_argument("run_dir", nargs="?", help="a trained run (default: the default recipe's model, untrained)")
    p.add_argument("--neighbors", nargs="+", metavar="TOKEN", default=[],
                   help="show the tokens whose embeddings are nearest to these (needs RUN_DIR)")
    p.add_argument("--compare", nargs=2, type=int, metavar=("A", "B"),
                   help="what training changed between two kept snapshots of RUN_DIR (the steps of evaluations)")
    args = p.parse_args(argv)
    if args.compare and not args.run_dir:
        raise UserError("--compare needs a trained run: tinylm explain RUN_DIR --compare A B")
    if args.neighbors and not args.run_dir:
        raise UserError("--neighbors needs a trained run: tinylm explain RUN_DIR --neighbors WORD ...")
    if args.run_dir and not Path(args.run_dir).is_dir():
        raise UserError(f"run directory not found: {args.run_dir}")

    if args.compare:
        from tinylm.compare import compare

        compare(args.run_dir, *args.compare)
        return 0
    from tinylm.explain import explain

    explain(args.run_dir, args.neighbors)
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "explain": cmd_explain, "export": cmd_export,
            "download": cmd_download}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-V", "--version"):
        from tinylm import __version__

        print(f"tinylm {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}'; commands: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        # Asked for, the usage is the answer (stdout); without a command it explains the error (stderr).
        print(__doc__.split("\n\n")[-1].rstrip() if __doc__ else "", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UserError as e:
        if os.environ.get("RANK", "0") not in ("", "0"):
            # Under torchrun every process meets most errors: rank 0 says it, and torchrun stops the others as
            # soon as it has ended. An error of this process alone (its GPU missing) is said after the wait.
            time.sleep(RANK_ERROR_WAIT)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of the output left (`tinylm sample RUN | head -3`): stop quietly, as `cat` does. stdout goes
        # to /dev/null first, or Python's own flush at exit meets the closed pipe and prints an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE's exit status in a shell
    except OSError as e:
        if e.errno not in (errno.ENAMETOOLONG, errno.ELOOP):  # a path no system could use: the user's to fix
            raise  # anything else that reached here is a bug in tinylm: its traceback helps
        print(f"error: cannot use the path {shown(str(e.filename))}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tinylm sample ... | head`: the reader left, nothing is wrong
        return 0
