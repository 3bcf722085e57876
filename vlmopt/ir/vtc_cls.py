"""VTC-CLS's score (THU-MIG/VTC-CLS at e41ac9b, "[CLS] Token Tells Everything Needed for
Training-free Efficient MLLMs", arXiv 2412.05819): the vision encoder's [CLS] attention over the
patches, ensembled over several ViT layers.

Written from the official rule (no code copied):
``llava/model/multimodal_encoder/clip_encoder.py`` ``cls_token_only`` takes HF's eager
attentions of the CLIP tower, per layer the CLS query row over the patches averaged over heads,
and sums them over ``attentions[start_layer:-1]``; ``llava/model/llava_arch.py``
``encode_images`` keeps the ``token_num`` patches with the highest sum (``torch.topk``) in patch
order, projects them and rebuilds the sequence with ``position_ids=None`` (contiguous
positions). ``start_layer`` comes from the command line (``--layer``, default "16" in
``llava/eval/model_vqa_loader.py``; CLIP ViT-L/14 has 24 layers).

vlmopt's reading of the layer set: the layers ``start_layer`` (Python slice semantics, so a
negative value counts from the end) up to and including the layer whose output the projector
reads. On LLaVA-1.5 (features of layer -2) this is exactly the official ``[start_layer:-1]``;
the official slice hard-codes -1, which on a tower read at its last layer (synth-llava) would
leave the feature layer out. The official code runs batch 1 (``squeeze(0)``); here every row
ranks its own patches. The probabilities are recomputed for the CLS query row only, from each
layer's input, layer_norm1 and q/k projections (vlmopt.ir.select.cls_attention_row), so the
tower keeps SDPA. CLS-free towers (Qwen-VL, SigLIP) are refused: VTC-CLS defines no variant
without [CLS], and the received-attention analogue is VisionZip's rule (method "visionzip").
"""

from __future__ import annotations

import torch
from torch import nn

from vlmopt.ir.select import cls_attention_row, has_cls, vision_layers


def ensemble_layers(n_layers: int, feature_layer: int, start_layer: int) -> list[int]:
    """ViT layer indices VTC-CLS sums: ``start_layer`` .. the layer producing
    ``hidden_states[feature_layer]`` (an index into L + 1 hidden states)."""
    f = feature_layer % (n_layers + 1)
    return list(range(n_layers))[start_layer:f]


class VisionClsEnsemble(nn.Module):
    """pixel_values -> (features [B, Nv, Dv], cls_score [B, Nv]).

    features: exactly ``blocks.Vision``'s (CLS dropped); cls_score: sum over the ensemble's
    layers of the head-mean CLS attention to each patch."""

    def __init__(self, tower: nn.Module, feature_layer: int, drop_cls: bool, start_layer: int):
        super().__init__()
        layers = vision_layers(tower)
        if not (drop_cls and has_cls(tower)):
            raise ValueError("no CLS attention: needs a CLS vision tower whose CLS is dropped "
                             "(strategy 'default')")
        self.layer_ids = ensemble_layers(len(layers), feature_layer, start_layer)
        if not self.layer_ids:
            f = feature_layer % (len(layers) + 1) - 1
            raise ValueError(f"field 'start_layer'={start_layer} selects no ViT layer: the "
                             f"projector reads layer {f} of {len(layers)} (0-based)")
        self.tower, self.feature_layer = tower, feature_layer
        self.layers = [layers[i] for i in self.layer_ids]  # shared, read-only (not registered)

    def forward(self, pixel_values: torch.Tensor):
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[self.feature_layer][:, 1:]  # [B, Nv, Dv]
        rows = [cls_attention_row(layer, out.hidden_states[i])[0].mean(1)[:, 1:]  # [B, Nv]
                for i, layer in zip(self.layer_ids, self.layers)]
        return feats, torch.stack(rows).sum(0)
