"""Weight quantization of an emitted decode graph with onnxruntime's own tools.

int8: ``quantize_dynamic`` of the weight MatMuls (MatMulInteger / DynamicQuantizeMatMul: int8
weights, activations quantized per call). int4: ``MatMulNBitsQuantizer`` (MatMulNBits contrib op,
blockwise symmetric 4-bit weights, float activations). Both rewrite the file in place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vlmopt.errors import VlmoptError

log = logging.getLogger(__name__)
INT4_BLOCK = 32


def quantize_decode(path: Path, mode: str) -> None:
    import onnx

    path = Path(path)
    tmp = path.with_name(path.stem + f".{mode}.onnx")
    if mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(tmp), op_types_to_quantize=["MatMul"],
                         weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"MatMulConstBOnly": True})
    elif mode == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=INT4_BLOCK,
                                 is_symmetric=True, op_types_to_quantize=("MatMul",))
        q.process()
        q.model.save_model_to_file(str(tmp), use_external_data_format=False)
    else:
        raise VlmoptError(f"unknown quantization {mode!r} (int8 or int4)")
    data = path.with_name(path.name + ".data")
    os.replace(tmp, path)
    if data.exists():  # NOTE: the quantized graph carries its weights inline
        data.unlink()
    log.info("quantized %s to %s", path.name, mode)
