"""Train a built-in model (``builtin:synth-llava`` or ``builtin:synth-qwen``) on SynthVQA.

    python examples/train_synth.py --family qwen --out OUT [--init DIR] ...

Loss: the answer token and eos, plus per-token auxiliary losses (colour, shape and glyph under
each 8x8-px visual token, from the renderer) read by LayerNorm + linear heads from (a) the vision
features the LLM reads and (b) the LLM's last hidden state at each visual position: without them
the LLM fits the text prior and turns the visual tokens into content-free attention sinks.
Optional: a grounding loss (a middle layer's visual states say which tokens the question is
about), an attention loss (upper-half decoder layers: head 0 of the answer position attends to
those tokens, head 1 to a spatial question's reference object), a curriculum, question-type
weights, a vision-only phase first. The heads are discarded: the checkpoint is a plain HF one.

Families (one LLM token per 8x8-px cell, row-major, in both):
- ``llava``: CLIP ViT (patch 8) + projector at 112x112; (a) = the ViT output without CLS.
- ``qwen``: Qwen2.5-VL (patch 4, windowed ViT, 2x2 merger, M-RoPE); (a) = the merger output in
  the order the LLM receives it. Dynamic resolution: with probability 1 - --native-frac an image
  is the 112-px scene resized (bicubic) to a random height and width in --size-range (multiples
  of 8: the processor keeps them). Rendering stays at 112 px (SynthVQA's splits unchanged; native
  images keep the glyph's ink inside one token); the labels follow the resize.

``--init DIR`` starts from a checkpoint's weights with a fresh warm-up and cosine schedule. Each
evaluation saves the checkpoint (files replaced atomically) with ``training.json``: the stages of
the --init checkpoint plus this one (command, recipe, held-out figures; at the end the test split
at 112x112 and with blank images, per type). Deterministic for a seed (on one device and thread
count). Uses a GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vlmopt import preprocess_qwen
from vlmopt.data import synthvqa
from vlmopt.frontend import synth_llava, synth_qwen

S = synthvqa.IMAGE_SIZE
CELL = 8  # px of image per visual token, both families
HELD_SEED = 7_777_777  # held-out monitor stream: neither train, calib nor test


# ----------------------------------------------------------------------------- labels


def owner_map(scene) -> np.ndarray:
    """[S, S] uint8 as ``synthvqa.patch_labels`` draws it: object index + 1, 255 = glyph tile."""
    lab = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(lab)
    for i, o in enumerate(scene.objects):
        synthvqa._draw_shape(draw, o, i + 1)  # NOTE: the renderer's own shapes, not a copy
    gx, gy = scene.glyph_xy
    draw.rectangle([gx, gy, gx + 8, gy + 10], fill=255)
    return np.asarray(lab)


def token_grids(scene, h: int = S, w: int = S) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Per-token labels of ``scene`` shown at h x w px: ([3, h/8, w/8] colour/shape/glyph ids as
    ``synthvqa.patch_labels``, [h/8, w/8] owners as its ``owners=True``, the glyph's cell)."""
    own = owner_map(scene)
    if (h, w) != (S, S):
        own = np.asarray(Image.fromarray(own).resize((w, h), Image.NEAREST))
    gh, gw = h // CELL, w // CELL
    val = np.where(own == 255, 9, own).astype(np.int64)[:gh * CELL, :gw * CELL]  # 0..9
    cell = (np.arange(gh * CELL)[:, None] // CELL) * gw + np.arange(gw * CELL)[None] // CELL
    counts = np.bincount((cell * 10 + val).ravel(), minlength=gh * gw * 10).reshape(gh, gw, 10)
    counts[..., 0] = 0
    best = counts.argmax(-1)  # ties: the smallest value, as np.unique + argmax
    best[counts.max(-1) < CELL * CELL // 8] = 0
    owners = np.where(best == 9, 255, best)
    labels = np.zeros((3, gh, gw), dtype=np.int64)
    colours = list(synthvqa.COLOURS)
    for i, o in enumerate(scene.objects):
        labels[0][best == i + 1] = 1 + colours.index(o.colour)
        labels[1][best == i + 1] = 1 + synthvqa.SHAPES.index(o.shape)
    gx, gy = scene.glyph_xy  # the cell under the centre of the ink (synthvqa.glyph_patch)
    g = (int((gy + 5.5) * h / S) // CELL, int((gx + 4.5) * w / S) // CELL)
    labels[2][g] = 1 + list(synthvqa.GLYPHS).index(scene.glyph)
    return labels, owners, g


def token_labels(grids) -> torch.Tensor:
    """token_grids of each sample -> [M, 3], row-major: the visual tokens' order in input_ids."""
    return torch.from_numpy(np.concatenate([g[0].reshape(3, -1).T for g in grids]))


def relevance(s, owners: np.ndarray, glyph_cell: tuple) -> np.ndarray:
    """Per-token grounding labels like ``owners``: 1 on the tokens of what the question asks
    about (the object(s), the glyph's ink), 2 on a spatial question's reference object, else 0."""
    words = s.question.rstrip("?").lower().split()
    shapes = set(synthvqa.SHAPES) | {synthvqa.plural(x) for x in synthvqa.SHAPES}

    def match(o, ws):
        return (not (set(ws) & set(synthvqa.COLOURS)) or o.colour in ws) and \
            (not (set(ws) & set(synthvqa.SIZES)) or o.size in ws) and \
            (not (set(ws) & shapes) or o.shape in ws or synthvqa.plural(o.shape) in ws)

    objs, tag = s.scene.objects, {}
    if s.type == "spatial":
        cut = words.index("relative")
        tag = {i: 1 for i, o in enumerate(objs) if match(o, words[:cut])}
        tag.update({i: 2 for i, o in enumerate(objs) if match(o, words[cut:])})
    elif s.type != "glyph":
        tag = {i: 1 for i, o in enumerate(objs) if match(o, words)}
    out = np.zeros_like(owners)
    for i, v in tag.items():
        out[owners == i + 1] = v
    if s.type == "glyph":
        out[glyph_cell] = 1
    return out


class Family:
    """What differs between the families: model class, prompt encoding, pixels, features."""

    def __init__(self, name: str, attn_eager: bool):
        import transformers

        self.name, self.seen = name, {}
        if name == "llava":
            self.cls = transformers.LlavaForConditionalGeneration
            self.cfg, self.vocab = synth_llava.make_config()
            self.processor = synth_llava.make_processor(self.vocab)
            self.text_ids = lambda t: self.processor.tokenizer(t)["input_ids"]
            self.eos_id = self.processor.tokenizer.eos_token_id
            self.vision_width = self.cfg.vision_config.hidden_size
            self.attn = {"attn_implementation": "eager"} if attn_eager else {}
            if attn_eager:
                self.cfg._attn_implementation = "eager"
        else:
            self.cls = transformers.Qwen2_5_VLForConditionalGeneration
            self.cfg, self.vocab = synth_qwen.make_config()
            tok = synth_qwen.make_tokenizer(self.vocab)
            self.text_ids = lambda t: tok.encode(t).ids
            self.eos_id = self.vocab.index(synth_qwen.IM_END)
            self.vision_width = self.cfg.vision_config.out_hidden_size
            # eager (it returns the weights) in the decoder only: the ViT keeps sdpa
            self.attn = {"attn_implementation": {"text_config": "eager", "vision_config": "sdpa",
                                                 "": "sdpa"}} if attn_eager else {}
            if attn_eager:
                self.cfg.text_config._attn_implementation = "eager"
        self.image_id, self.text_cfg = self.cfg.image_token_id, self.cfg.text_config

    def build(self, init: Path | None, device, mrope_section: list[int] | None = None):
        cfg = self.cfg
        if init and mrope_section:
            cfg = self.cls.config_class.from_pretrained(init)
        if mrope_section:  # the M-RoPE frequency split of (t, h, w): read at rotary init
            rope = cfg.text_config.rope_parameters
            if sum(mrope_section) != sum(rope["mrope_section"]):
                raise SystemExit(f"--mrope-section: must sum to {sum(rope['mrope_section'])} "
                                 f"(head_dim / 2), got {mrope_section}")
            rope["mrope_section"] = list(mrope_section)
        extra = {"config": cfg} if init and mrope_section else {}
        model = (self.cls.from_pretrained(init, use_safetensors=True, **self.attn, **extra)
                 if init else self.cls(cfg))
        if self.name == "llava":  # (a): the ViT output the projector reads
            layer = self.cfg.vision_feature_layer
            model.model.vision_tower.register_forward_hook(
                lambda m, i, o: self.seen.__setitem__("feats", o.hidden_states[layer][:, 1:]))
        return model.to(device)

    def record_attention(self, model, layers) -> list:
        """The attention weights [B, H, T, T] of these decoder layers in training forwards.
        NOTE: a hook, not output_attentions=True: that records the ViT's too, at 2x step time."""
        got: list = []
        for layer in model.model.language_model.layers[layers]:
            layer.self_attn.register_forward_hook(
                lambda m, i, o: got.append(o[1]) if m.training else None)
        return got

    def encode(self, prompt: str, answer: str | None, n_image: int) -> list[int]:
        """Chat-templated prompt with the image token expanded to n_image, + answer and eos."""
        ids = self.text_ids(f"USER: {prompt} ASSISTANT:" if self.name == "llava"  # = template
                            else synth_qwen.prompt_text(prompt))
        at = ids.index(self.image_id)
        ids = ids[:at] + [self.image_id] * n_image + ids[at + 1:]
        if answer is not None:
            ids += [self.vocab.index(answer), self.eos_id]
        return ids

    def pixel_inputs(self, images, device) -> dict:
        if self.name == "llava":  # = the checkpoint's CLIP processor for 112x112 RGB input
            x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]))
            return {"pixel_values": ((x.permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5).to(device)}
        # = the checkpoint's preprocessing (transformers' Qwen2VLImageProcessor, bit for bit)
        cfg = preprocess_qwen.image_config(synth_qwen.image_processor_config())
        pv, grid = zip(*(preprocess_qwen.pixels(im, cfg) for im in images))
        return {"pixel_values": torch.from_numpy(np.concatenate(pv)).to(device),
                "image_grid_thw": torch.from_numpy(np.stack(grid)).to(device)}

    def features(self, model, out=None, inputs=None) -> torch.Tensor:
        """(a) [M, D], all images' tokens in order: of the full forward that just ran (out), or
        of a vision-only forward of these inputs."""
        if self.name == "llava":
            if inputs is not None:  # the hook keeps the output
                model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
            return self.seen.pop("feats").flatten(0, 1)
        if inputs is not None:
            return model.model.visual(inputs["pixel_values"],
                                      grid_thw=inputs["image_grid_thw"]).pooler_output
        return torch.cat(out.image_outputs.pooler_output)

    def save_processor(self, out: Path) -> None:
        if self.name == "llava":
            self.processor.save_pretrained(out)
        else:
            synth_qwen.save_processor(out, self.vocab)


def train_size(args, stream: int, index: int) -> tuple[int, int]:
    """(height, width) of a training image: 112x112 for llava; for qwen native with probability
    --native-frac, else random multiples of 8 in --size-range (a pure function of the index)."""
    if args.family == "llava":
        return S, S
    rng = random.Random(stream * 1_000_003 + index)
    if rng.random() < args.native_frac:
        return S, S
    lo, hi = (int(v) // CELL for v in args.size_range.split(","))
    return CELL * rng.randint(lo, hi), CELL * rng.randint(lo, hi)


def show(samples, sizes, blank=False, grids=True):
    """The samples' images at sizes [(h, w)] (or flat grey) and their token_grids."""
    images = [Image.new("RGB", (w, h), (128, 128, 128)) if blank else
              s.image if s.image.size == (w, h) else s.image.resize((w, h), Image.BICUBIC)
              for s, (h, w) in zip(samples, sizes)]
    return images, [token_grids(s.scene, *hw) if grids else None for s, hw in zip(samples, sizes)]


def batch(fam, samples, sizes, device, with_answer=True, blank=False):
    """Inputs for samples shown at sizes: ids/mask [B, T] (left padding: the answer sits at the
    same place in every row), model kwargs, and the per-token grids of each sample."""
    images, grids = show(samples, sizes, blank, grids=with_answer)
    seqs = [fam.encode(s.prompt, s.answer if with_answer else None, (h // CELL) * (w // CELL))
            for s, (h, w) in zip(samples, sizes)]
    pad = torch.nn.utils.rnn.pad_sequence  # left padding with id 0 (the pad token)
    ids = pad([torch.tensor(q) for q in seqs], batch_first=True, padding_side="left")
    mask = pad([torch.ones(len(q), dtype=torch.long) for q in seqs], True, padding_side="left")
    kw = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
          **fam.pixel_inputs(images, device)}
    if fam.name == "llava":
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
    else:  # the model builds M-RoPE positions from the grids (left padding masked out)
        kw["mm_token_type_ids"] = (ids == fam.image_id).int().to(device)
    return kw, grids


@torch.no_grad()
def evaluate(fam, model, held, device, sizes=None, blank=False, bs=50):
    """Greedy first-token accuracy (answers are one word), overall and per question type."""
    model.eval()
    hits = defaultdict(list)
    for i in range(0, len(held), bs):
        chunk = held[i:i + bs]
        sz = sizes[i:i + bs] if sizes else [(S, S)] * len(chunk)
        kw, _ = batch(fam, chunk, sz, device, with_answer=False, blank=blank)
        pred = model(**kw, logits_to_keep=1, use_cache=False).logits[:, -1].argmax(-1).tolist()
        for s, p in zip(chunk, pred):
            hits[s.type].append(fam.vocab[p] == s.answer)
    model.train()
    per = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    return sum(sum(v) for v in hits.values()) / len(held), per


def parse_type_weights(ap, spec: str | None) -> list[float] | None:
    types = synthvqa.QUESTION_TYPES
    try:
        given = {t.strip(): float(w) for t, _, w in (kv.partition("=") for kv in spec.split(","))}
    except ValueError:
        ap.error(f"--type-weights: expected TYPE=WEIGHT,..., got {spec!r}")
    if set(given) - set(types) or any(w < 0 for w in given.values()):
        ap.error(f"--type-weights: unknown type(s) {sorted(set(given) - set(types))} or a "
                 f"negative weight; types: {', '.join(types)}")
    return [given.get(t, 1.0) for t in types]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arg = ap.add_argument
    arg("--family", choices=("llava", "qwen"), default="llava")
    arg("--out", type=Path, help="default: vlmopt/builtin/synth-FAMILY")
    arg("--init", type=Path, help="start from this checkpoint's weights")
    for name, default in (("--steps", 4000), ("--batch-size", 16), ("--warmup", 150),
                          ("--seed", 0), ("--threads", 2), ("--vision-batch-size", 32)):
        arg(name, type=int, default=default)
    for name, default in (("--lr", 1e-3), ("--vision-lr", 2e-3), ("--aux-weight", 0.5),
                          ("--clip", 1.0)):
        arg(name, type=float, default=default)
    arg("--eval-every", type=int, default=250,
        help="steps between held-out evaluations and checkpoint saves (also in --vision-steps)")
    arg("--ground-weight", type=float, default=0.0, help="weight of the grounding loss")
    arg("--attn-weight", type=float, default=0.0, help="weight of the attention loss")
    arg("--aux-bg-weight", type=float, default=1.0,
        help="class weight of 'background' in the per-token losses (< 1: objects count more)")
    arg("--type-weights", help="sample question types unevenly, e.g. 'glyph=3,shape=2'")
    arg("--curriculum", type=int, default=0, help="for this many steps scenes hold fewer "
        "objects (2-3 at first, growing to the full 3-8)")
    arg("--vision-steps", type=int, default=0, help="first train the vision tower alone on the "
        "per-token labels for this many steps (fast: no decoder)")
    arg("--stop-after", type=int, help="stop (and save) after this many steps of --steps")
    arg("--size-range", default="88,144", help="qwen: LO,HI px of resized training images")
    arg("--native-frac", type=float, default=0.5,
        help="qwen: fraction of training images kept at the native 112x112")
    arg("--mrope-section", type=lambda v: [int(x) for x in v.split(",")],
        help="qwen: T,H,W split of the decoder's rotary frequencies (default: the checkpoint's). "
        "Sections are contiguous from the highest frequency, so width gets the lowest: at "
        "4,6,6 a 14-token row spans < 0.05 rad and left/right cannot be read from positions")
    arg("--held-n", type=int, default=350, help="held-out monitor samples")
    arg("--test-n", type=int, default=synthvqa.SPLIT_SIZES["test"],
        help="test-split samples evaluated at the end (0: none)")
    return ap


def save(fam, model, out: Path, record: dict) -> None:
    """Save into a scratch directory, then move each file into ``out`` (os.replace): a run
    stopped mid-save leaves the previous files whole."""
    tmp = out.parent / f".{out.name}.saving"
    model.save_pretrained(tmp, safe_serialization=True)
    fam.save_processor(tmp)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def previous_stages(init: Path | None) -> list[dict]:
    f = init / "training.json" if init else None
    rec = json.loads(f.read_text()) if f and f.is_file() else None
    return [] if rec is None else rec.get("stages") or [rec]


def cosine(base: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine down to 5% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                     max(1, steps - warmup))))


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    weights = parse_type_weights(ap, args.type_weights) if args.type_weights else None
    lo, _, hi = args.size_range.partition(",")
    if not (lo.isdigit() and hi.isdigit() and 0 < int(lo) <= int(hi)
            and int(lo) % CELL == int(hi) % CELL == 0):
        ap.error(f"--size-range: LO,HI with LO <= HI, multiples of {CELL}; got {args.size_range}")
    out_dir = args.out or Path(f"vlmopt/builtin/synth-{args.family}")
    command = shlex.join(["python", *([sys.argv[0], *sys.argv[1:]] if argv is None
                                      else ["examples/train_synth.py", *argv])])
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fam = Family(args.family, attn_eager=bool(args.attn_weight))
    if args.mrope_section and args.family != "qwen":
        ap.error("--mrope-section: qwen only")
    model = fam.build(args.init, device, args.mrope_section)
    model.train()
    stages = previous_stages(args.init)
    n_cls = (len(synthvqa.COLOURS) + 1, len(synthvqa.SHAPES) + 1, len(synthvqa.GLYPHS) + 1)
    D = fam.text_cfg.hidden_size

    def heads(width):  # LayerNorm first: no reward for growing feature norms
        return torch.nn.ModuleList([torch.nn.Sequential(torch.nn.LayerNorm(width),
                                                        torch.nn.Linear(width, n))
                                    for n in n_cls]).to(device)

    aux = torch.nn.ModuleList([heads(fam.vision_width), heads(D)])
    # grounding head: a middle layer's visual states say which tokens the question is about,
    # so later layers can read them out (breaks the text-prior plateau)
    ground = torch.nn.Sequential(torch.nn.LayerNorm(D), torch.nn.Linear(D, 3)).to(device)
    mid = fam.text_cfg.num_hidden_layers // 2
    attentions = fam.record_attention(model, slice(mid, None)) if args.attn_weight else []

    def aux_loss(f, labels, hs):  # f [M, D] token features, labels [M, 3]
        total = 0.0
        for j, head in enumerate(hs):
            w = torch.ones(n_cls[j], device=device)
            w[0] = args.aux_bg_weight
            total = total + F.cross_entropy(head(f), labels[:, j], weight=w)
        return total

    held = [synthvqa.sample(HELD_SEED, i) for i in range(args.held_n)]
    recipe = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}

    def record(step, acc, per, **extra):
        stage = {"command": command, "recipe": recipe, "step": step, "held_out_accuracy": acc,
                 "held_out_per_type": per, "wall_s": round(time.time() - t0),
                 "data": f"SynthVQA generator v{synthvqa.GENERATOR_VERSION}", **extra}
        return {"stages": [*stages, stage], "hardware": f"{device}, {args.threads} thread(s)",
                "held_out_monitor": f"{args.held_n} samples of synthvqa.sample({HELD_SEED}, i) "
                "at 112x112, neither train, calib nor test"}

    train_seed = synthvqa.SPLIT_SEEDS["train"] + args.seed
    t0 = time.time()
    if args.vision_steps:  # phase 1: the vision tower alone, on the dense per-token labels
        vision = model.model.vision_tower if fam.name == "llava" else model.model.visual
        vparams = list(vision.parameters()) + list(aux[0].parameters())
        vopt = torch.optim.AdamW(vparams, lr=args.vision_lr, weight_decay=0.01, betas=(0.9, 0.98))
        vstream = train_seed + 3_000_017  # its own stream (the decoder phase starts at index 0)
        for step in range(args.vision_steps):
            for g in vopt.param_groups:  # warm-up and cosine over the phase
                g["lr"] = min(1.0, (step + 1) / args.warmup) * cosine(
                    args.vision_lr, step, args.vision_steps, 0)
            idx = [step * args.vision_batch_size + j for j in range(args.vision_batch_size)]
            samples = [synthvqa.sample(vstream, i) for i in idx]
            images, grids = show(samples, [train_size(args, vstream, i) for i in idx])
            feats = fam.features(model, inputs=fam.pixel_inputs(images, device))  # [M, Dv]
            loss = aux_loss(feats, token_labels(grids).to(device), aux[0])
            vopt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vparams, args.clip)
            vopt.step()
            if (step + 1) % 50 == 0:
                print(f"  vision step {step + 1} loss {loss.item():.3f} "
                      f"{time.time() - t0:.0f}s", flush=True)
            if (step + 1) % args.eval_every == 0 or step + 1 == args.vision_steps:
                save(fam, model, out_dir, record(0, None, None, vision_step=step + 1))
        del vopt

    params = list(model.parameters()) + list(aux.parameters()) + list(ground.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    n_types = len(synthvqa.QUESTION_TYPES)
    type_rng, type_next = random.Random(args.seed), [0] * n_types
    run_loss, n_run, acc, per = 0.0, 0, None, None
    last = min(args.steps, args.stop_after or args.steps)
    for step in range(last):
        for g in opt.param_groups:
            g["lr"] = cosine(args.lr, step, args.steps, args.warmup)
        objects = (3, 8)
        if step < args.curriculum:
            objects = (2, min(8, 3 + 6 * step // args.curriculum))
        if weights is None:
            idx = [step * args.batch_size + j for j in range(args.batch_size)]
        else:  # stream index 7 m + t is a question of type t: draw types, then take the next m
            idx = []
            for t in type_rng.choices(range(n_types), weights=weights, k=args.batch_size):
                idx.append(n_types * type_next[t] + t)
                type_next[t] += 1
        samples = [synthvqa.sample(train_seed, i, objects) for i in idx]
        kw, grids = batch(fam, samples, [train_size(args, train_seed, i) for i in idx], device)
        ids = kw["input_ids"]
        attentions.clear()
        out = model(**kw, logits_to_keep=3, output_hidden_states=True, use_cache=False)
        logits = out.logits[:, :2].float()  # predicts answer, then eos
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, -2:].reshape(-1))
        is_img = ids == fam.image_id  # [B, T]; visual tokens in row-major cell order
        labels = token_labels(grids).to(device)  # [M, 3]
        rel = torch.from_numpy(np.concatenate([relevance(s, g[1], g[2]).ravel()
                                               for s, g in zip(samples, grids)])).to(device)
        for head, label in ((0, 1), (1, 2)) if args.attn_weight else ():
            # head 0 of the answer position (T - 3): what is asked about; head 1: the reference
            want = torch.zeros(is_img.shape, device=device)
            want[is_img] = (rel == label).float()
            want = want / want.sum(-1, keepdim=True).clamp(min=1)  # [B, T]
            for a in attentions:  # [B, H, T, T] per upper-half layer
                loss = loss - args.attn_weight / len(attentions) * (
                    want * torch.log(a[:, head, -3] + 1e-6)).sum(-1).mean()
        if args.ground_weight:
            loss = loss + args.ground_weight * F.cross_entropy(
                ground(out.hidden_states[mid][is_img]), rel,
                weight=torch.tensor([0.2, 1.0, 1.0], device=device))
        vis = out.hidden_states[-1][is_img]  # [M, D]
        for f, hs in ((fam.features(model, out), aux[0]), (vis, aux[1])):
            loss = loss + args.aux_weight / 6 * aux_loss(f, labels, hs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        run_loss, n_run = run_loss + loss.item(), n_run + 1
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == last:
            acc, per = evaluate(fam, model, held, device)
            print(f"step {step + 1:5d} loss {run_loss / n_run:.3f} held-out acc {acc:.3f} "
                  f"[{fmt(per)}] {time.time() - t0:.0f}s", flush=True)
            run_loss, n_run = 0.0, 0
            if step + 1 < last:
                save(fam, model, out_dir, record(step + 1, acc, per))
    final, test = {}, [synthvqa.sample(synthvqa.SPLIT_SEEDS["test"], i) for i in range(args.test_n)]
    # the released checkpoint's figures: test split at 112x112, with blank images, mixed sizes
    for name, data, kw in (("test", test, {}), ("blank", test, {"blank": True}),
                           ("held_out_mixed_sizes", held if fam.name == "qwen" else [],
                            {"sizes": [train_size(args, HELD_SEED, i) for i in range(len(held))]})):
        if data:
            a, p = evaluate(fam, model, data, device, **kw)
            final |= {f"{name}_accuracy": a, f"{name}_per_type": p}
            print(f"{name} ({len(data)} samples): {a:.3f} [{fmt(p)}]", flush=True)
    if last:
        save(fam, model, out_dir, record(last, acc, per, **final))
    print(f"saved {out_dir}")


def fmt(per: dict) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in per.items())


if __name__ == "__main__":
    main()
