"""Plumbing shared by the entry points: atomic JSON and file writes, the command line derived from
a config dataclass (one source for every default and its help), data-parallel set-up, one-line
errors at the boundary.

Nothing here is about the paper; it is kept in one small file so that the other files are not.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist


class InputError(ValueError):
    """Bad input from the user (a file, an argument); the message names it."""


def atomic_write(path: str, write) -> None:
    """write(tmp) into a temporary file beside `path`, then rename it over `path`: a reader never
    sees half a file, and an interrupted write leaves the old one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=1) + "\n")
    atomic_write(path, write)


def read_json(path: str) -> dict:
    """A JSON object from `path`; InputError naming the file if it is missing, invalid or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def git(*args: str) -> str:
    """The output of `git args` in this repository."""
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()


def git_commit() -> str:
    """The repository's short commit, with "+dirty" for uncommitted changes to tracked files."""
    try:
        sha = git("rev-parse", "--short", "HEAD")
        if sha and git("status", "--porcelain", "--untracked-files=no"):
            sha += "+dirty"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha or "unknown"


def arg(default, help: str, **argparse_kw):
    """A config field with its command-line help: `steps: int = arg(300, "optimiser steps")`."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **argparse_kw})
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kw})


def parse_config(cls, argv=None, description: str = ""):
    """Build the command line from the fields of the dataclass `cls` (`--field-name`, type from the
    annotation, default and help from `arg`) and return cls(**parsed)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        kw = dict(f.metadata)
        if "help" not in kw:                          # not a command-line field
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind = str(f.type).split(" |")[0]
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kw)
        elif kind.startswith("list"):
            p.add_argument(flag, nargs="+", type=int if "int" in kind else str, default=default, **kw)
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], default=default, **kw)
    return cls(**vars(p.parse_args(argv)))


def dist_setup() -> tuple:
    """(rank, world size); under torchrun, initialises torch.distributed (NCCL on a GPU, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the processes (t itself in one process)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def run_main(main, *extra_errors) -> None:
    """Run `main()`; bad input (ValueError, OSError and `extra_errors`) ends with one line on stderr,
    `error: <file or argument>: <problem>`, and exit status 1 instead of a traceback."""
    try:
        main()
    except (ValueError, OSError, *extra_errors) as e:
        print("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        sys.exit(1)
