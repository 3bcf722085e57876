"""``vlmopt show``: the visual tokens a plan keeps, drawn on one image (vlmopt.visualize).

    vlmopt show OUT --image I --prompt P --out kept.png          # OUT of optimize or apply
    vlmopt show --plan plan.json [--model M] --image I --prompt P --out kept.png

One PNG, one panel per place the plan changes the visual tokens (selection, each drop, runs of
frozen layers), from a PyTorch run of the plan's graph. ``--out`` is never overwritten unless
``--force`` is given; the file appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from vlmopt.errors import VlmoptError


def add_parser(sub) -> None:
    s = sub.add_parser("show", help="draw the visual tokens a plan keeps at each stage on an "
                       "image (one PNG, one panel per stage)")
    s.add_argument("source", nargs="?", metavar="OUT",
                   help="output directory of vlmopt optimize or apply (its plan.json)")
    s.add_argument("--plan", help="plan.json to draw (instead of OUT)")
    s.add_argument("--model", help="the model to run the plan on (default: the one the plan "
                   "names)")
    s.add_argument("--image", required=True)
    s.add_argument("--prompt", required=True, help="prompt containing <image> once")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(fn=cmd_show)


def check_png_out(out: Path, force: bool) -> None:
    """Refuse, writing nothing, an --out that is not a new .png file beside a writable parent
    (an existing file only with --force)."""
    if out.is_dir():
        raise VlmoptError(f"--out {out}: is a directory; give a file name")
    if out.suffix.lower() != ".png":
        raise VlmoptError(f"--out {out}: give a file name ending in .png")
    if (out.exists() or out.is_symlink()) and not force:
        raise VlmoptError(f"--out {out}: exists (nothing overwritten; --force replaces it)")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise VlmoptError(f"--out {out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VlmoptError(f"--out {out}: parent directory {parent} is not writable")


def write_png(out: Path, data: bytes, force: bool) -> None:
    """Whole or not at all: a temp file beside ``out``, then a link (no overwrite) or, with
    ``force``, a rename over it."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        if force:
            tmp.replace(out)
        else:
            os.link(tmp, out)  # NOTE: fails if out appeared meanwhile: never clobbers
    except FileExistsError:
        raise VlmoptError(f"--out {out}: exists (nothing overwritten; --force replaces it)") \
            from None
    except OSError as e:
        raise VlmoptError(f"--out {out}: cannot write ({e.strerror or e}); nothing was "
                          "written") from None
    finally:
        tmp.unlink(missing_ok=True)


def plan_path(args) -> Path:
    if args.source and args.plan:
        raise VlmoptError("give OUT or --plan, not both")
    if args.plan:
        return Path(args.plan)
    if not args.source:
        raise VlmoptError("give OUT (an optimize or apply output directory) or --plan "
                          "plan.json")
    src = Path(args.source)
    if not src.exists():
        raise VlmoptError(f"{src}: no such directory")
    if not src.is_dir():
        raise VlmoptError(f"{src}: not a directory; give an optimize or apply output "
                          "directory, or --plan for a plan file")
    if not (src / "plan.json").is_file():
        what = ("an artifact whose manifest lists its passes by name only"
                if (src / "manifest.json").is_file() else "not an optimize or apply output")
        raise VlmoptError(f"{src}: no plan.json ({what}); give --plan plan.json and --model")
    return src / "plan.json"


def cmd_show(args) -> int:
    from vlmopt.runtime import open_image

    # NOTE: every input and --out are checked before anything heavy is imported or loaded
    out = Path(args.out)
    check_png_out(out, args.force)
    if args.prompt.count("<image>") != 1:
        raise VlmoptError(f"--prompt must contain <image> exactly once (found "
                          f"{args.prompt.count('<image>')})")
    image = Path(args.image)
    if not image.is_file():
        raise VlmoptError(f"--image {image}: no such file"
                          + (" (a directory)" if image.is_dir() else ""))
    im = open_image(image, f"--image {image}").convert("RGB")
    where = plan_path(args)

    from vlmopt.frontend.load import load, resolve_model
    from vlmopt.plan import Plan

    plan = Plan.load(where)
    model = args.model or plan.model_name
    try:
        resolve_model(model)
    except VlmoptError as e:
        if args.model:
            raise
        raise VlmoptError(f"{e} (the model the plan names; give --model)") from None
    lm = load(model)
    if lm.processor is None:
        raise VlmoptError(f"{model}: no processor files; show needs them to encode the image")

    from vlmopt import visualize
    from vlmopt.api import apply_plan
    from vlmopt.report import plan_label

    gm = apply_plan(lm, plan)
    batch = visualize.encode_one(lm, args.prompt, im)
    tr = visualize.trace(lm, gm, batch)[0]
    label = plan_label([(n, dataclasses.asdict(c)) for n, c in plan.passes])
    write_png(out, visualize.render(tr, f"{label}  |  {image.name}"), args.force)
    print(f"wrote {out}: " + " -> ".join(s.label for s in tr.stages))
    return 0
