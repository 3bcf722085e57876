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


# ----------------------------------------------------------------------------- QuantLinear


def _pack(codes, bits: int, block: int):
    """Signed codes [N, K] -> MatMulNBits B [N, n_blocks, block * bits / 8] (uint8, unsigned
    codes code + 2^(bits-1), so the default zero point 2^(bits-1) restores them)."""
    import numpy as np

    n, k = codes.shape
    nb = -(-k // block)
    u = np.zeros((n, nb * block), dtype=np.uint8)
    u[:, :k] = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    u[:, k:] = 1 << (bits - 1)  # padding dequantizes to 0
    u = u.reshape(n, nb, block)
    if bits == 8:
        return u
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)  # low nibble first


def lower_quant_linears(gm, path: Path) -> int:
    """Replace the float MatMul of every 4/8-bit QuantLinear (passes/quantize.py) in the ONNX
    graph at ``path`` by MatMulNBits built from its own codes and scales: the same dequantized
    weights, stored as integers. Other bit widths stay float MatMuls. Returns the count."""
    import hashlib

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from vlmopt.ir.quant import QuantLinear

    def key(a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        return a.shape, hashlib.sha1(a.tobytes()).hexdigest()

    quant = {}
    for m in gm.modules():
        if isinstance(m, QuantLinear) and m.bits in (4, 8) and m.group_size >= 16:
            w = m.weight.detach().float().numpy()  # [N, K]
            quant[key(w.T)] = (m, False)  # MatMul(x, W^T) with W^T folded
            quant[key(w)] = (m, True)  # MatMul(x, Transpose(W))
    if not quant:
        return 0
    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    done, nodes = 0, []
    for node in list(g.node):
        nodes.append(node)
        if node.op_type != "MatMul":
            continue
        b = node.input[1]
        src = producers.get(b)
        name = src.input[0] if src is not None and src.op_type == "Transpose" else b
        if name not in inits:
            continue
        hit = quant.get(key(numpy_helper.to_array(inits[name])))
        if hit is None or hit[1] != (src is not None and src.op_type == "Transpose"):
            continue
        m = hit[0]
        n_out, k_in = m.out_features, m.in_features
        blob = _pack(m.qweight.numpy(), m.bits, m.group_size)
        scales = m.scales.detach().float().numpy().reshape(-1)
        bname, sname = f"vlmopt_nbits_{done}_B", f"vlmopt_nbits_{done}_scales"
        g.initializer.extend([numpy_helper.from_array(blob, bname),
                              numpy_helper.from_array(scales, sname)])
        new = helper.make_node("MatMulNBits", [node.input[0], bname, sname], list(node.output),
                               name=f"vlmopt_nbits_{done}", domain="com.microsoft", K=k_in,
                               N=n_out, bits=m.bits, block_size=m.group_size)
        nodes[-1] = new
        done += 1
    del g.node[:]
    g.node.extend(nodes)
    if done:
        used = {i for n in g.node for i in n.input}
        for init in [i for i in g.initializer if i.name not in used]:  # the float weights
            g.initializer.remove(init)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        data = path.with_name(path.name + ".data")
        external = data.exists()
        if external:
            data.unlink()  # NOTE: everything was loaded into memory by onnx.load
        onnx.save(model, str(path), save_as_external_data=external, location=data.name)
    log.info("lowered %d QuantLinear MatMuls of %s to MatMulNBits", done, path.name)
    return done
