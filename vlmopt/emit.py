"""emit: a rewritten block graph -> an ONNX package that runs without vlmopt's PyTorch code.

    OUT/onnx/prefill.onnx   pixel values, input ids, attention mask, position ids
                            -> last-position logits, next position id, per-layer K/V + masks
    OUT/onnx/decode.onnx    one token, its position, per-layer past K/V + masks -> same outputs
    OUT/processor/          the checkpoint's tokenizer, processor and chat-template files
    OUT/manifest.json       graphs, inputs/outputs, per-layer KV lengths, opset, sha256 of files

Both graphs come from ``torch.onnx.export(..., dynamo=True)`` of the export forms in
``vlmopt.export_graph``; the drops (TopK/Gather) are inside the prefill graph. Before emit
declares success it checks ONNX Runtime against the PyTorch graph on calibration samples
(logits and greedy generations) and raises a VlmoptError naming the sample otherwise.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import fx

from vlmopt import runtime
from vlmopt.errors import VlmoptError
from vlmopt.export_graph import DecodeForm, PrefillForm
from vlmopt.ir.capture import complete_inputs, decoder_nodes

log = logging.getLogger(__name__)

OPSET = 18
SCHEMA = "vlmopt.artifact/1"
PARITY_ATOL = 1e-4
PARITY_TOKENS = 4  # greedy tokens generated per parity sample
PARITY_SCREEN = 32  # calibration records screened for clear selection margins
PARITY_MARGIN = 1e-5  # a greedy pick this far ahead of the runner-up cannot flip on rounding
QUANTIZE = ("int8", "int4")
FUSE = True  # fused contrib ops (vlmopt.emit_fuse) unless --no-fuse
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "processor_config.json", "preprocessor_config.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def io_names(n_layers: int, layout: tuple[str, ...] = ()) -> dict[str, list[str]]:
    per = [f"{{}}.{i}.{k}" for i in range(n_layers) for k in ("key", "value", "mask")]
    present = [p.format("present") for p in per]
    return {"prefill_in": ["input_ids", "pixel_values", "attention_mask", "position_ids",
                           *layout],
            "prefill_out": ["logits", "next_position_ids", *present],
            "decode_in": ["input_ids", "position_ids", *(p.format("past") for p in per)],
            "decode_out": ["logits", "next_position_ids", *present]}


# ----------------------------------------------------------------------------- inputs


def dynamic(gm: fx.GraphModule) -> bool:
    """A dynamic-resolution graph (Qwen-VL): exported and checked at batch 1."""
    return gm.meta["vlmopt"]["n_visual"] is None


def layout_names(gm: fx.GraphModule) -> tuple[str, ...]:
    """The prefill graph's layout inputs, as the family's adapter declared them at capture."""
    return tuple(gm.meta["vlmopt"]["layout"]["inputs"]) if dynamic(gm) else ()


def export_feeds(gm: fx.GraphModule, batch: dict) -> dict[str, torch.Tensor]:
    """The prefill graph's inputs for a graph batch, plus the family's layout inputs (Qwen-VL:
    tensors from the image grids; Idefics3: the tiles' pixel mask; AnyRes: the packing's
    gather layout from the image size)."""
    feeds = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask",
                                   "position_ids")}  # NOTE: the graphs' input order
    if dynamic(gm):
        from vlmopt.frontend.family import adapter_of_graph

        meta = gm.meta["vlmopt"]
        feeds.update(adapter_of_graph(meta).layout_inputs(meta["layout"], batch))
    return feeds


def _synthetic_dynamic(gm: fx.GraphModule, vocab: int, n_text: int, seed: int) -> dict:
    """One prompt around one reference image, as the family builds its inputs."""
    from vlmopt.frontend.family import adapter_of_graph

    meta = gm.meta["vlmopt"]
    family = adapter_of_graph(meta)
    g = torch.Generator().manual_seed(seed)
    nv, img = family.example_image_tokens(meta["vision_example"]), meta["image_token_id"]
    ids = torch.randint(5, vocab, (n_text,), generator=g)
    ids[ids == img] = 5
    ids = torch.cat([ids[:2], torch.full((nv,), img), ids[2:]])[None]
    amask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": amask,
            **family.example_inputs(meta["vision_example"], ids, amask, img, g)}


def synthetic_batch(gm: fx.GraphModule, vocab: int, n: int = 2, n_text: int = 8,
                    seed: int = 0, ragged: bool = True) -> dict[str, torch.Tensor]:
    """Random prompts of ``n_text`` text tokens around one image block (for models without
    processor files); ``ragged``: sample i has i more tokens, so the batch is left-padded.
    Dynamic resolution: one sample of the reference grid (the export batch is 1)."""
    if dynamic(gm):
        return _synthetic_dynamic(gm, vocab, n_text, seed)
    meta = gm.meta["vlmopt"]
    nv, img, size = meta.get("n_visual_project", meta["n_visual"]), meta["image_token_id"], \
        meta["image_size"]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        t = n_text + (i if ragged else 0)
        ids = torch.randint(5, vocab, (t,), generator=g)
        ids[ids == img] = 5
        rows.append(torch.cat([ids[:2], torch.full((nv,), img), ids[2:]]))
    T = max(len(r) for r in rows)
    input_ids = torch.zeros(n, T, dtype=torch.long)
    amask = torch.zeros(n, T, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r):] = r
        amask[i, T - len(r):] = 1
    pix = torch.randn(n, 3, size, size, generator=g)
    return complete_inputs({"input_ids": input_ids, "attention_mask": amask,
                            "pixel_values": pix})


def calib_batch(lm, gm: fx.GraphModule, records: list, n: int) -> tuple[dict, list[str]]:
    """(batch, sample names) for export and parity: calibration records when the model has a
    processor, a synthetic batch otherwise. A graph with a greedy selection (divprune,
    kcenter) takes the records whose picks win by a clear margin: see ``decision_margins``."""
    from vlmopt import inputs

    if records and lm.processor is not None:
        chunk = records[:max(1, n)]
        if _margin_modules(gm) and len(records) > len(chunk):
            pool = records[:max(PARITY_SCREEN, n)]
            enc = complete_inputs(inputs.encode(lm.processor, [r.prompt for r in pool],
                                                [r.load_image() for r in pool]))
            m = decision_margins(gm, enc)
            order = sorted(range(len(pool)), key=lambda i: (m[i] < PARITY_MARGIN, i))
            chunk = [pool[i] for i in order[:max(1, n)]]
            log.info("parity samples: %d of %d screened records have every greedy pick ahead "
                     "by >= %g", int((m >= PARITY_MARGIN).sum()), len(pool), PARITY_MARGIN)
        batch = inputs.encode(lm.processor, [r.prompt for r in chunk],
                              [r.load_image() for r in chunk])
        names = [f"{getattr(r, 'image', '?')} / {r.prompt!r}" for r in chunk]
        return complete_inputs(batch), names
    batch = synthetic_batch(gm, int(lm.config.text_config.vocab_size), n=max(2, min(n, 4)))
    return batch, [f"synthetic #{i}" for i in range(batch["input_ids"].shape[0])]


def _margin_modules(gm: fx.GraphModule) -> list:
    return [m for m in gm.modules() if hasattr(m, "decision_margin")]


@torch.no_grad()
def decision_margins(gm: fx.GraphModule, batch: dict) -> np.ndarray:
    """Per sample: the smallest winning margin of any greedy selection in ``gm`` (inf: none).

    A greedy max-min pick (DivPrune, k-center) compares distances that differ by ~1e-5 among
    near-identical background tokens, while ONNX Runtime and PyTorch kernels round differently
    at ~1e-7; on such a sample the runtimes may keep different (equally valid) tokens. Parity
    compares the two runtimes on samples whose picks all win by >= PARITY_MARGIN, where a
    mismatch means a real export error, not a tie."""
    found = []
    hooks = [m.register_forward_hook(lambda mod, args, out: found.append(
        mod.decision_margin(*args))) for m in _margin_modules(gm)]
    try:
        gm(**batch)
    finally:
        for h in hooks:
            h.remove()
    B = batch["input_ids"].shape[0]
    m = torch.stack(found).amin(0) if found else torch.full((B,), float("inf"))
    return m.double().numpy()


# ----------------------------------------------------------------------------- export


def _export(module, args: tuple, kwargs: dict, dynamic_shapes, in_names, out_names,
            path: Path) -> None:
    # NOTE: torch.while_loop (a greedy selection's ONNX Loop) is traced with dynamo, whose
    # per-code caches outlive an export: a loop body traced for one graph's static shapes would
    # be reused for the next graph's symbolic ones and specialize them. Each export starts clean.
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                     dynamic_shapes=dynamic_shapes, input_names=in_names,
                                     output_names=out_names, verbose=False, optimize=True)
        except Exception as e:  # NOTE: no dynamo=False fallback: the exporter never needed one
            raise VlmoptError(f"emit: ONNX export of {path.name} failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    prog.save(str(path), external_data=None)  # external data only when > 2 GB


def export_prefill(gm: fx.GraphModule, batch: dict, path: Path) -> tuple:
    """Write the prefill graph of ``gm`` at ``path``; returns its PyTorch outputs on ``batch``
    (the example inputs of the decode export)."""
    names = io_names(len(decoder_nodes(gm)), layout_names(gm))
    B, S = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("prompt_len", max=1 << 20)
    pf = PrefillForm(gm).eval()
    ds = {"input_ids": {0: B, 1: S}, "pixel_values": {0: B}, "attention_mask": {0: B, 1: S},
          "position_ids": {0: B, 1: S}}
    feeds = export_feeds(gm, batch)
    if dynamic(gm):  # batch 1; the family's own dimensions
        from vlmopt.frontend.family import adapter_of_graph

        meta = gm.meta["vlmopt"]
        ds = adapter_of_graph(meta).export_dims(meta["vision_example"], S, pf.unit)
        ds = {k: v for k, v in ds.items() if k in feeds}
    with torch.no_grad():
        _export(pf, (), feeds, ds, names["prefill_in"], names["prefill_out"], path)
        return pf(**feeds)


def export_graphs(gm: fx.GraphModule, batch: dict, onnx_dir: Path) -> None:
    """Write onnx/prefill.onnx and onnx/decode.onnx for the graph ``gm``."""
    n_layers = len(decoder_nodes(gm))
    names = io_names(n_layers, layout_names(gm))
    out = export_prefill(gm, batch, onnx_dir / "prefill.onnx")
    B = None if dynamic(gm) else torch.export.Dim("batch", min=1, max=1024)
    tok = out[0].argmax(-1, keepdim=True)  # [B, 1]
    past = list(out[2:])
    pds = []
    batch_dim = {} if B is None else {0: B}
    for i in range(n_layers):  # layer i's cache length: its own symbol, shared by k, v, mask
        P = torch.export.Dim(f"past_{i}", min=1, max=1 << 20)
        pds += [{**batch_dim, 2: P}, {**batch_dim, 2: P}, {**batch_dim, 1: P}]
    df = DecodeForm(gm).eval()
    pos_dim = {} if B is None else ({1: B} if out[1].dim() == 3 else {0: B})
    with torch.no_grad():
        _export(df, (tok, out[1], past), {},
                {"input_ids": batch_dim, "position_ids": pos_dim, "past": pds},
                names["decode_in"], names["decode_out"], onnx_dir / "decode.onnx")


# ----------------------------------------------------------------------------- parity


@torch.no_grad()
def torch_generate(gm: fx.GraphModule, batch: dict, max_new: int, eos: int | None):
    """Greedy generation with the export forms in PyTorch: (tokens [B, N], logits per step)."""
    pf, df = PrefillForm(gm).eval(), DecodeForm(gm).eval()
    out = pf(**batch)
    steps = [out[0].float().numpy()]
    tok = out[0].argmax(-1)
    toks, done = [tok], tok == (eos if eos is not None else -1)
    for _ in range(max_new - 1):
        if bool(done.all()):
            break
        out = df(tok[:, None], out[1], list(out[2:]))
        steps.append(out[0].float().numpy())
        tok = torch.where(done, tok, out[0].argmax(-1))
        done = done | (tok == (eos if eos is not None else -1))
        toks.append(tok)
    return torch.stack(toks, 1).numpy(), steps


def check_parity(art: runtime.Artifact, gm: fx.GraphModule, batch: dict, names: list[str],
                 max_new: int = PARITY_TOKENS) -> dict:
    """ONNX Runtime vs the PyTorch graph; raises VlmoptError naming the first bad sample.

    A sample on which a greedy selection had a pick won by < PARITY_MARGIN (a near-tie, see
    ``decision_margins``) may legitimately keep other tokens on the other runtime: a mismatch
    there is counted as a tie flip, not an error, and the report says how many there were."""
    with torch.no_grad():
        ref_logits = gm(**batch).float().numpy()  # the block graph itself, first token
    margins = decision_margins(gm, batch) if _margin_modules(gm) else None
    tfeeds = export_feeds(gm, batch)
    feeds = {k: v.numpy() for k, v in tfeeds.items()}
    eos = art.manifest["tokens"].get("eos_token_id")
    t_tok, t_steps = torch_generate(gm, tfeeds, max_new, eos)
    o_tok, o_steps = art.generate_ids(feeds, max_new)
    worst, flips = 0.0, []
    for i, name in enumerate(names):
        d0 = float(np.abs(o_steps[0][i] - ref_logits[i]).max())
        ds = [float(np.abs(a[i] - b[i]).max()) for a, b in zip(o_steps, t_steps)]
        d = max([d0, *ds])
        same = o_tok.shape == t_tok.shape and np.array_equal(o_tok[i], t_tok[i])
        if (d > PARITY_ATOL or not same) and margins is not None and margins[i] < PARITY_MARGIN:
            flips.append(i)
            continue
        worst = max(worst, d)
        if d > PARITY_ATOL:
            raise VlmoptError(f"emit: parity failed on sample {i} ({name}): ONNX Runtime vs "
                              f"PyTorch logits max abs diff {d:.3g} > {PARITY_ATOL:g}")
        if not same:
            raise VlmoptError(f"emit: parity failed on sample {i} ({name}): generated "
                              f"{o_tok[i].tolist()} on ONNX Runtime, {t_tok[i].tolist()} on "
                              f"PyTorch (logits max abs diff {d:.3g})")
    out = {"samples": len(names), "max_abs_logit_diff": worst, "tokens": int(t_tok.shape[1]),
           "atol": PARITY_ATOL}
    if margins is not None:
        out.update(min_selection_margin=float(margins.min()), margin_threshold=PARITY_MARGIN,
                   tie_flips=len(flips))
        if flips:
            log.warning("parity: %d of %d samples kept other tokens at a selection near-tie "
                        "(margin < %g); the other samples match", len(flips), len(names),
                        PARITY_MARGIN)
    if len(flips) == len(names):
        raise VlmoptError("emit: parity could not be checked: every sample kept other tokens "
                          "at a selection near-tie; pass more calibration records")
    return out


# ----------------------------------------------------------------------------- package


def merge_parity(results: list[dict]) -> dict:
    """One parity record over per-sample checks (dynamic resolution checks one at a time)."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    out["samples"] = sum(r["samples"] for r in results)
    out["max_abs_logit_diff"] = max(r["max_abs_logit_diff"] for r in results)
    out["tokens"] = max(r["tokens"] for r in results)
    return out


def copy_processor(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in PROCESSOR_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _graph_io(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def desc(v):
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": dims}

    return {"inputs": [desc(v) for v in m.graph.input],
            "outputs": [desc(v) for v in m.graph.output]}


def write_checksums(out: Path, manifest: dict) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
                   and (p.parts[len(out.parts)] in ("onnx", "processor")))
    manifest["files"] = {p.relative_to(out).as_posix(): {"sha256": runtime.sha256(p),
                                                         "bytes": p.stat().st_size}
                         for p in files}
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)  # NOTE: last
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def emit(lm, gm: fx.GraphModule, out_dir: Path, calib_records: list, *,
         quantize: str | None = None, parity_samples: int = 4, fuse: bool = FUSE) -> dict:
    """Export ``gm`` into the existing empty directory ``out_dir``, check parity, return the
    manifest. The caller owns the directory (temp dir + rename for nothing half-written).
    ``fuse``: rewrite both graphs onto ONNX Runtime's fused contrib ops (vlmopt.emit_fuse)
    before parity is checked, so the check runs on the graphs that ship."""
    if quantize not in (None, *QUANTIZE):
        raise VlmoptError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    out = Path(out_dir)
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    if dynamic(gm):  # batch 1: one parity sample a batch (the images may differ in size)
        singles = [calib_batch(lm, gm, [r], 1) for r in calib_records[:parity_samples]] or \
            [(synthetic_batch(gm, int(lm.config.text_config.vocab_size), seed=i),
              [f"synthetic #{i}"]) for i in range(2)]
        batch, names = singles[0]
    else:
        batch, names = calib_batch(lm, gm, calib_records, parity_samples)
        singles = [(batch, names)]
    log.info("exporting prefill and decode graphs (%d layers)", len(decoder_nodes(gm)))
    export_graphs(gm, batch, onnx_dir)
    from vlmopt.emit_quant import lower_quant_linears

    # the quantize pass's QuantLinears become MatMulNBits before parity is checked
    lowered = {g: lower_quant_linears(gm, onnx_dir / f"{g}.onnx") for g in ("prefill", "decode")}
    fusion = {"enabled": False}
    if fuse:
        from vlmopt.emit_fuse import fuse_artifact_graphs

        fusion = fuse_artifact_graphs(onnx_dir)
    processor = copy_processor(lm.path, out / "processor") if lm.processor is not None else []
    manifest = build_manifest(lm, gm, out, processor)
    manifest["matmul_nbits_from_quantize_pass"] = lowered
    manifest["fusion"] = fusion
    # NOTE: checksums last (hashing GBs twice is slow); the runtime needs only the graphs here
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    art = runtime.Artifact(out, verify=False)
    manifest["parity"] = merge_parity([check_parity(art, gm, b, n) for b, n in singles])
    log.info("parity: %s", manifest["parity"])
    if quantize:
        qfeeds = {k: v.numpy() for k, v in export_feeds(gm, batch).items()}
        ref_tok, _ = art.generate_ids(qfeeds, PARITY_TOKENS)
        del art
        from vlmopt.emit_quant import quantize_decode

        quantize_decode(onnx_dir / "decode.onnx", quantize)
        manifest["graphs"]["decode"].update(_graph_io(onnx_dir / "decode.onnx"))
        q_tok, _ = runtime.Artifact(out, verify=False).generate_ids(qfeeds, PARITY_TOKENS)
        n = min(ref_tok.shape[1], q_tok.shape[1])
        manifest["quantize"] = {"mode": quantize, "graph": "decode",
                                "token_agreement": float((ref_tok[:, :n] == q_tok[:, :n]).mean())}
    write_checksums(out, manifest)
    return manifest


def build_manifest(lm, gm: fx.GraphModule, out: Path, processor: list[str]) -> dict:
    cfg = lm.config
    tc = cfg.text_config
    decs = decoder_nodes(gm)
    first = gm.get_submodule(decs[0].target).layer.self_attn
    meta = gm.meta["vlmopt"]
    n_vis = [d.meta["vlmopt"]["n_visual"] for d in decs]
    image = {"size": meta["image_size"], "n_visual": meta.get("n_visual_project",
                                                              meta["n_visual"]),
             "image_token_id": meta["image_token_id"]}
    kv_len = [f"n_text + {v}" for v in n_vis]
    if dynamic(gm):  # counts follow the image: each layer's budgets, in order
        image.update(dynamic=True, layout=meta["layout"])
        n_vis = [d.meta["vlmopt"].get("visual_keeps", []) for d in decs]
        kv_len = [f"n_text + visual tokens after budgets {v}" for v in n_vis]
    else:
        image["image_seq_length"] = int(cfg.image_seq_length)
    gen = {}
    if (lm.path / "generation_config.json").is_file():
        gen = json.loads((lm.path / "generation_config.json").read_text())
    eos = gen.get("eos_token_id", tc.eos_token_id)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return {
        "schema": SCHEMA,
        "model": {"name": lm.name, "fingerprint": lm.fingerprint},
        "passes": list(meta.get("passes", [])),
        "opset": OPSET,
        "graphs": {"prefill": {"file": "onnx/prefill.onnx", **_graph_io(out / "onnx/prefill.onnx")},
                   "decode": {"file": "onnx/decode.onnx", **_graph_io(out / "onnx/decode.onnx")}},
        "kv": {"n_layers": len(decs), "num_key_value_heads": tc.num_key_value_heads,
               "head_dim": int(first.head_dim), "dtype": "float32",
               # layer i's cache after prefill holds n_text + n_visual[i] tokens
               "n_visual_per_layer": n_vis,
               "length_per_layer": kv_len},
        "image": image,
        "tokens": {"eos_token_id": eos, "vocab_size": tc.vocab_size,
                   "max_position_embeddings": getattr(tc, "max_position_embeddings", None),
                   "pad_token_id": next((p for p in (getattr(cfg, "pad_token_id", None),
                                                     getattr(tc, "pad_token_id", None))
                                         if p is not None), None)},
        "processor": "processor" if processor else None,
        "quantize": None,
    }
