"""``vlmopt eval OUT``: an exported artifact evaluated on ONNX Runtime with its own copied
processor files, as the model is evaluated in PyTorch (vlmopt.evaluation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlmopt import runtime
from vlmopt.errors import VlmoptError
from vlmopt.ir.capture import complete_inputs


def artifact_eval(root, data: str | None, plan: str | None = None):
    """(runner, processor, data): the runner is the artifact's prefill on ONNX Runtime
    (last-position logits [B, V]), the processor its own copied processor files."""
    if plan:
        raise VlmoptError("--plan: an artifact already carries its plan; evaluate the artifact "
                          "alone (or the model with --plan)")
    art = runtime.Artifact(root)
    m = art.manifest
    if not m.get("processor"):
        raise VlmoptError(f"{root}: the artifact has no processor files; evaluation needs them")
    from vlmopt.data.defaults import default_data

    proc_dir = Path(root) / m["processor"]
    data = default_data(m["model"]["name"], data)
    layout = (m["image"].get("layout") or {}) if art.dynamic else {}
    if art.dynamic and layout.get("kind") == "anyres":
        from vlmopt.frontend.llava_next import load_anyres_processor

        return _anyres(art, layout), load_anyres_processor(proc_dir, layout["model_type"]), data
    if art.dynamic and layout.get("kind") == "tiles":
        from vlmopt.frontend.idefics3 import load_tile_processor

        return _tiles(art), load_tile_processor(proc_dir, layout["model_type"]), data
    if art.dynamic and layout.get("kind") == "internvl":
        from vlmopt.frontend.internvl import load_internvl_processor

        return (_flat_tiles(art, m["image"]["image_token_id"], layout["tokens_per_tile"]),
                load_internvl_processor(proc_dir, layout["tokens_per_tile"]), data)
    if art.dynamic:
        return _qwen(art, layout), _qwen_processor(proc_dir, m, layout), data
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(proc_dir, local_files_only=True,
                                              trust_remote_code=False)

    def run(batch: dict) -> torch.Tensor:
        feeds = {k: v.numpy() for k, v in complete_inputs(batch).items()}
        return torch.from_numpy(art.logits(feeds)).float()

    return run, processor, data


def _one(batch: dict, b: int) -> dict:
    """Sample ``b`` of a left-padded batch without its padding (the graphs run at batch 1)."""
    keep = batch["attention_mask"][b].bool().numpy()
    pos = batch["position_ids"]
    return {"input_ids": batch["input_ids"][b:b + 1, keep].numpy(),
            "attention_mask": batch["attention_mask"][b:b + 1, keep].numpy(),
            "position_ids": (pos[:, b:b + 1, keep] if pos.dim() == 3 else
                             pos[b:b + 1, keep]).numpy()}


def _qwen_processor(proc_dir: Path, m: dict, layout: dict):
    from vlmopt.frontend.qwen_processor import load_qwen_processor
    from vlmopt.frontend.qwen_vl import QwenInputs

    return QwenInputs(load_qwen_processor(proc_dir), image_token_id=m["image"]["image_token_id"],
                      merge=layout["merge"])


def _qwen(art, layout: dict):
    from vlmopt.export_vision import layout_feeds

    def run(batch: dict) -> torch.Tensor:
        rows, start = [], 0
        grids = batch["image_grid_thw"].numpy()
        for b in range(batch["input_ids"].shape[0]):  # one image per prompt
            n = int(grids[b].prod())
            feeds = {**_one(batch, b),
                     "pixel_values": batch["pixel_values"][start:start + n].numpy(),
                     **layout_feeds(layout, grids[b:b + 1])}
            start += n
            rows.append(art.logits(feeds)[0])
        return torch.from_numpy(np.stack(rows)).float()

    return run


def _tiles(art):
    def run(batch: dict) -> torch.Tensor:
        rows = []
        for b in range(batch["input_ids"].shape[0]):
            pix = batch["pixel_values"][b]
            real = pix.flatten(1).ne(0).any(-1)  # the processor's padding tiles are all-zero
            feeds = {**_one(batch, b), "pixel_values": pix[real][None].numpy(),
                     "pixel_attention_mask": batch["pixel_attention_mask"][b, real][None].numpy()}
            rows.append(art.logits(feeds)[0])
        return torch.from_numpy(np.stack(rows)).float()

    return run


def _flat_tiles(art, image_token_id: int, tokens_per_tile: int):
    """InternVL: every prompt's tiles concatenated; sample b's are its visual tokens' worth."""
    def run(batch: dict) -> torch.Tensor:
        rows, start = [], 0
        for b in range(batch["input_ids"].shape[0]):
            n = int((batch["input_ids"][b] == image_token_id).sum()) // tokens_per_tile
            feeds = {**_one(batch, b),
                     "pixel_values": batch["pixel_values"][start:start + n].numpy()}
            start += n
            rows.append(art.logits(feeds)[0])
        return torch.from_numpy(np.stack(rows)).float()

    return run


def _anyres(art, layout: dict):
    from vlmopt.preprocess_anyres import layout_feeds

    side2 = int(layout["side"]) ** 2

    def run(batch: dict) -> torch.Tensor:
        rows = []
        for b in range(batch["input_ids"].shape[0]):
            h, w = (int(x) for x in batch["image_sizes"][b].tolist())
            lay = layout_feeds(layout, h, w)
            n = int(lay["anyres_index"].max()) // side2  # the image's tiles (the rest: padding)
            feeds = {**_one(batch, b), "pixel_values": batch["pixel_values"][b:b + 1, :n].numpy(),
                     **lay}
            rows.append(art.logits(feeds)[0])
        return torch.from_numpy(np.stack(rows)).float()

    return run
