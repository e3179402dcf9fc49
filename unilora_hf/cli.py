"""`unilora-hf`, the command line (also ``python -m unilora_hf``).

    unilora-hf push DIR REPO_ID              upload a saved adapter folder in one commit, with a model card
    unilora-hf info REPO_ID_OR_DIR           config, files, base model, D, fingerprint, trainable count
    unilora-hf merge BASE ADAPTER OUT_DIR    a plain transformers model folder with ΔW merged into the weights
    unilora-hf export-lora ADAPTER OUT_DIR   an equivalent standard PEFT LoRA adapter (for serving engines)
    unilora-hf list DIR                      the adapters in a folder of many, grouped by what can share one base

Adapters are local folders or Hub repo ids, fetched through huggingface_hub's cache (``--revision``,
``--token``, ``--cache-dir``, ``--local-files-only``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` as usual).
A failure exits with status 1 (2 for a usage error) and prints one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .errors import AdapterFormatError, BaseModelError, SaveError, UniLoraError
from .version import __version__

PROG = "unilora-hf"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def one_line(exc: BaseException) -> str:
    """The exception's message with all whitespace runs (newlines included) collapsed to one space."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on ONE line (argparse prints the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _hub_args(parser: argparse.ArgumentParser, what: str = "the adapter") -> None:
    parser.add_argument("--revision", help=f"branch, tag or commit sha of {what}'s Hub repo (default: main)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the one stored by `hf auth login`)")
    parser.add_argument("--endpoint", help="Hub URL for adapter repos (default: HF_ENDPOINT or huggingface.co); "
                                           "base models are fetched by transformers, which follows HF_ENDPOINT")
    parser.add_argument("--cache-dir", help="huggingface_hub cache folder (default: HF_HUB_CACHE)")
    parser.add_argument("--local-files-only", action="store_true",
                        help="use the cache only, never the network (HF_HUB_OFFLINE=1 does the same)")


def _resolve(args, adapter: str) -> Path:
    from .hub import resolve_adapter

    return resolve_adapter(adapter, revision=args.revision, token=args.token, cache_dir=args.cache_dir,
                           local_files_only=args.local_files_only, endpoint=args.endpoint)


def _empty_out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SaveError(f"{out} exists and is not an empty folder; pass a new or empty OUT_DIR "
                              "(unilora-hf never overwrites files)")
    return out


# -- push -----------------------------------------------------------------------------------------------
def cmd_push(args) -> None:
    from .push import push_adapter

    url = push_adapter(args.dir, args.repo_id, private=args.private, token=args.token, revision=args.revision,
                       commit_message=args.commit_message, create_pr=args.create_pr, endpoint=args.endpoint,
                       base_model_name_or_path=args.base_model)
    print(url)


# -- info -----------------------------------------------------------------------------------------------
def adapter_info(folder: Path) -> dict:
    """What ``info`` reports about the adapter in ``folder``, as a JSON-ready dict."""
    from .serialization import CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, WEIGHTS_NAME, read_adapter

    files = read_adapter(folder)
    cfg, meta, base = files.config, files.meta, files.base_model
    names = [n for n in (CONFIG_NAME, WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME) if (folder / n).is_file()]
    layout = meta.get("layout") or {}
    extra = {name: t.numel() for name, t in sorted(files.tensors.items())}
    return {
        "folder": str(folder),
        "format": "peft" if PEFT_CONFIG_NAME in names else "native",
        "written_by": files.source,
        "integrity": files.integrity,
        "files": {n: (folder / n).stat().st_size for n in names},
        "base_model": base.get("name_or_path"),
        "base_local_name": base.get("local_name"),
        "base_revision": base.get("revision"),
        "auto_class": base.get("auto_class"),
        "config": cfg.to_dict(),
        "projection_spec": meta.get("projection_spec"),
        "d": cfg.theta_d_length,
        "D": meta.get("D"),
        "adapted_layers": layout.get("num_layers"),
        "fingerprint": layout.get("fingerprint"),
        "trained_tensors": extra,
        "trainable": cfg.theta_d_length + sum(extra.values()),
    }


def _unrecorded_base(info: dict) -> str:
    local = info.get("base_local_name")
    return f"not recorded (trained on a local folder named {local!r})" if local else "not recorded"


def _print_info(adapter: str, revision: str | None, info: dict) -> None:
    cfg = info["config"]
    unknown = "not recorded (a PEFT-written adapter: known once loaded onto its base)"
    targets = cfg["target_modules"]
    rows = [
        ("adapter", adapter + (f" @ {revision}" if revision else "")),
        ("folder", info["folder"]),
        ("format", f"{info['format']} (written by {info['written_by']})"),
        ("integrity", "digest and checksum verified" if info["integrity"] == "verified" else
                      "not recorded (written by PEFT or an older unilora_hf): checked for everything else"),
        *[(f"file {name}", f"{size:,} bytes") for name, size in info["files"].items()],
        ("base model", f"{info['base_model'] or _unrecorded_base(info)} (revision {info['base_revision'] or 'not recorded'}, "
                       f"{info['auto_class'] or 'AutoModel'})"),
        ("projection", f"{cfg['projection']} (spec {info['projection_spec'] or 'peft-0.21'}), seed {cfg['proj_seed']}"),
        ("rank r", str(cfg["r"])),
        ("d (θ_d length)", f"{info['d']:,}"),
        ("D (LoRA parameters)", f"{info['D']:,}" if info["D"] is not None else unknown),
        ("target modules", ", ".join(targets) if isinstance(targets, list) else str(targets or "architecture default")),
        ("adapted layers", str(info["adapted_layers"]) if info["adapted_layers"] is not None else unknown),
        ("fingerprint", info["fingerprint"] or unknown),
        ("modules trained in full", ", ".join(cfg.get("modules_to_save") or []) or "none"),
        ("trainable parameters", f"{info['trainable']:,} (θ_d {info['d']:,} + other tensors "
                                 f"{info['trainable'] - info['d']:,})"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_info(args) -> None:
    info = adapter_info(_resolve(args, args.adapter))
    if args.json:
        print(json.dumps({"adapter": args.adapter, "revision": args.revision, **info}, indent=2))
    else:
        _print_info(args.adapter, args.revision, info)


# -- a folder of many adapters --------------------------------------------------------------------------
MAX_LISTED = 100_000


def _adapter_folders(root: Path) -> list[Path]:
    """``root`` itself when it holds an adapter, else its sub-folders that do (links skipped), sorted by name."""
    from .serialization import CONFIG_NAME, PEFT_CONFIG_NAME

    def holds(folder: Path) -> bool:
        return (folder / CONFIG_NAME).is_file() or (folder / PEFT_CONFIG_NAME).is_file()

    if not root.is_dir():
        raise AdapterFormatError(f"{root} is not a folder: list takes a folder of adapter folders")
    if holds(root):
        return [root]
    found = []
    with os.scandir(root) as entries:
        for i, entry in enumerate(entries):
            if i >= MAX_LISTED:
                raise AdapterFormatError(f"{root} holds more than {MAX_LISTED:,} entries; list a smaller folder")
            if entry.is_dir(follow_symlinks=False) and holds(Path(entry.path)):
                found.append(Path(entry.path))
    return sorted(found, key=lambda p: p.name)


def adapter_groups(root: Path) -> dict:
    """The adapters under ``root`` grouped by what adapters resident on one base must share (the config keys of
    ``SHARED_BY_RESIDENT_ADAPTERS``, D, the layout fingerprint, the trained tensors' names and sizes, the base
    model); every adapter is read with all of the loader's checks, and one that fails them is listed as refused."""
    from .config import SHARED_BY_RESIDENT_ADAPTERS

    folders = _adapter_folders(root)
    if not folders:
        raise AdapterFormatError(f"no adapter folders in {root} (folders holding unilora_config.json or "
                                 "adapter_config.json)")
    groups: dict[str, dict] = {}
    refused = []
    for folder in folders:
        try:
            info = adapter_info(folder)
        except UniLoraError as exc:
            refused.append({"name": folder.name, "folder": str(folder), "error": f"{type(exc).__name__}: {one_line(exc)}"})
            continue
        shared = {k: info["config"][k] for k in SHARED_BY_RESIDENT_ADAPTERS}
        shared.update(D=info["D"], fingerprint=info["fingerprint"], trained_tensors=info["trained_tensors"],
                      base_model=info["base_model"] or _unrecorded_base(info))
        key = json.dumps(shared, sort_keys=True, default=str)
        group = groups.setdefault(key, {"shared": shared, "adapters": []})
        group["adapters"].append({"name": folder.name, "folder": str(folder), "format": info["format"],
                                  "bytes": sum(info["files"].values())})
    ordered = sorted(groups.values(), key=lambda g: (-len(g["adapters"]), g["adapters"][0]["name"]))
    return {"folder": str(root), "adapters": len(folders), "groups": ordered, "refused": refused}


def cmd_list(args) -> None:
    listing = adapter_groups(Path(args.dir).expanduser())
    if args.json:
        print(json.dumps(listing, indent=2))
        return
    groups, refused = listing["groups"], listing["refused"]
    print(f"{listing['adapters']} adapter(s) in {listing['folder']}: {len(groups)} group(s) that can each be resident "
          f"on one base (load_adapter(..., adapter_name=...), mixed batches), {len(refused)} refused")
    for i, group in enumerate(groups, start=1):
        s = group["shared"]
        d, D = s["theta_d_length"], s["D"]
        print(f"\ngroup {i}: {len(group['adapters'])} adapter(s); base {s['base_model']}; {s['projection']} projection, "
              f"seed {s['proj_seed']}, r {s['r']}, d {d:,}, D {f'{D:,}' if D is not None else 'not recorded'}, "
              f"fingerprint {s['fingerprint'] or 'not recorded'}; trained besides θ_d: "
              f"{', '.join(s['trained_tensors']) or 'nothing'}")
        width = max(len(a["name"]) for a in group["adapters"])
        for a in group["adapters"]:
            print(f"  {a['name']:<{width}}  {a['bytes']:,} bytes ({a['format']} format)")
    if refused:
        print("\nrefused (they fail the loader's checks):")
        for r in refused:
            print(f"  {r['name']}: {r['error']}")


# -- merge and export -----------------------------------------------------------------------------------
def _load(args, base: str, folder: Path, merge: bool):
    from .auto import UniLoraAutoModel

    if (os.path.isabs(base) or base.startswith((".", "~"))) and not os.path.isdir(os.path.expanduser(base)):
        raise BaseModelError(f"the base model folder {base} does not exist; pass an existing folder or a Hub id")

    return UniLoraAutoModel.from_pretrained(
        base, folder, merge=merge, dtype=_torch_dtype(args.dtype), token=args.token, cache_dir=args.cache_dir,
        local_files_only=args.local_files_only, base_revision=args.base_revision)


def cmd_merge(args) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    out = _empty_out_dir(args.out_dir)
    folder = _resolve(args, args.adapter)
    model = _load(args, args.base, folder, merge=True)
    model.save_pretrained(out)
    written = ["model"]
    common = dict(revision=args.base_revision, token=args.token, cache_dir=args.cache_dir,
                  local_files_only=args.local_files_only)
    if cached_file(args.base, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False,
                   _raise_exceptions_for_connection_errors=False, **common):
        AutoTokenizer.from_pretrained(args.base, **common).save_pretrained(out)
        written.append("tokenizer")
    print(f"wrote the merged {' and '.join(written)} to {out}; load it with "
          f"transformers.{type(model).__name__}.from_pretrained({str(out)!r})")


def cmd_export_lora(args) -> None:
    from .peft_export import export_lora
    from .serialization import read_adapter

    out = _empty_out_dir(args.out_dir)
    folder = _resolve(args, args.adapter)
    base = args.base or read_adapter(folder).base_model.get("name_or_path")
    if not base:
        raise AdapterFormatError("the adapter records no base model; pass --base MODEL_ID_OR_DIR (the model it was "
                                 "trained on)")
    model = _load(args, base, folder, merge=False)
    paths = export_lora(model, out, dtype=_torch_dtype(args.export_dtype))
    print(f"wrote a PEFT LoRA adapter for {base} to {out} ({', '.join(Path(p).name for p in paths)}); load it with "
          f"peft.PeftModel.from_pretrained(base_model, {str(out)!r})")


# -- the parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Uni-LoRA adapters on the Hugging Face Hub: push, inspect, merge, "
                                            "export to standard LoRA, list a folder of many.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    push = sub.add_parser("push", help="upload a saved adapter folder to a Hub repo",
                          description="Upload the adapter in DIR (config + safetensors) and a rendered model card "
                                      "to REPO_ID in ONE commit (all or nothing); creates the repo if needed. "
                                      "Prints the commit (or pull-request) URL.")
    push.add_argument("dir", metavar="DIR", help="folder written by save_adapter / trainer.save_model")
    push.add_argument("repo_id", metavar="REPO_ID", help="namespace/name")
    push.add_argument("--private", action="store_true", default=None, help="create the repo private")
    push.add_argument("--revision", help="branch to commit to (default: main)")
    push.add_argument("--commit-message", help="default: 'Upload Uni-LoRA adapter'")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--token", help="Hub write token (default: HF_TOKEN or `hf auth login`)")
    push.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    push.add_argument("--base-model", help="the base model's Hub id to record, when the adapter was trained on a "
                                           "local folder (local paths are never published)")
    push.set_defaults(func=cmd_push)

    info = sub.add_parser("info", help="show an adapter's config, files, base model, D and fingerprint",
                          description="Show the adapter in a local folder or Hub repo: its files and sizes, "
                                      "the base model it was trained on, the projection, d, D, the layout "
                                      "fingerprint and the number of trainable parameters.")
    info.add_argument("adapter", metavar="REPO_ID_OR_DIR")
    _hub_args(info)
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    info.set_defaults(func=cmd_info)

    merge = sub.add_parser("merge", help="merge an adapter into its base: a plain transformers model folder",
                           description="Load BASE, apply ADAPTER, merge ΔW = B·A into the weights and write a "
                                       "standard transformers model folder (plus the base's tokenizer, if it has "
                                       "one) to OUT_DIR: it loads with the Auto class of the base and needs no "
                                       "unilora_hf.")
    merge.add_argument("base", metavar="BASE", help="base model: Hub id or folder")
    merge.add_argument("adapter", metavar="ADAPTER", help="adapter: Hub repo id or folder")
    merge.add_argument("out_dir", metavar="OUT_DIR", help="new or empty folder")
    _hub_args(merge)
    merge.add_argument("--base-revision", help="revision of BASE's Hub repo")
    merge.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load BASE in (default: auto)")
    merge.set_defaults(func=cmd_merge)

    export = sub.add_parser("export-lora", help="write an equivalent standard PEFT LoRA adapter",
                            description="Write ADAPTER as a standard PEFT LoRA adapter (adapter_config.json + "
                                        "adapter_model.safetensors, lora_alpha = r) with the same outputs, for "
                                        "PEFT and serving engines. Needs the base model: --base, or the one "
                                        "recorded in the adapter.")
    export.add_argument("adapter", metavar="ADAPTER", help="adapter: Hub repo id or folder")
    export.add_argument("out_dir", metavar="OUT_DIR", help="new or empty folder")
    export.add_argument("--base", help="base model, Hub id or folder (default: the one recorded in the adapter)")
    _hub_args(export)
    export.add_argument("--base-revision", help="revision of the base model's Hub repo")
    export.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the base in (default: auto)")
    export.add_argument("--export-dtype", choices=DTYPES[1:], default="float32",
                        help="dtype of the written LoRA matrices (default: float32)")
    export.set_defaults(func=cmd_export_lora)

    listing = sub.add_parser("list", help="list the adapters in a folder of many, grouped by what can share one base",
                             description="Read every adapter folder in DIR (its sub-folders, or DIR itself) with all of "
                                         "the loader's checks and group them by what adapters resident on one base "
                                         "must share: projection, seed, r, d, D, layout fingerprint, trained tensors "
                                         "and base model. One group loads onto one base model with "
                                         "load_adapter(..., adapter_name=...) and serves mixed batches; adapters "
                                         "that fail the checks are listed as refused.")
    listing.add_argument("dir", metavar="DIR", help="a folder of adapter folders")
    listing.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    listing.set_defaults(func=cmd_list)
    return parser


def _quiet() -> None:
    """No library warnings or progress bars on stderr: a failure is then exactly one line there."""
    import transformers
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hub_logging

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # e.g. its "Retrying in 1s" lines while the Hub is unreachable
    disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 usage error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet()
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (UniLoraError, OSError, ValueError, ImportError) as exc:
        # OSError covers huggingface_hub's HTTP, offline and cache errors and transformers' loading errors;
        # ValueError covers invalid repo ids and bad settings.
        print(f"{PROG} {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 — anything else is still one line, unless asked for the traceback
        if args.verbose:
            raise
        print(f"{PROG} {args.command}: error: {type(exc).__name__}: {one_line(exc)} (run with --verbose for the "
              "traceback)", file=sys.stderr)
        return 1
    return 0
