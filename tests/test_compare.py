"""compare: every method of the table runs on one model, same inputs, sane figures."""

from __future__ import annotations

import json

from vlmopt.cli import main


def test_compare_reports_every_method_with_flops_below_original(tiny_llava, synth_data, capsys):
    code = main(["compare", str(tiny_llava), "--data", str(synth_data), "--calib",
                 str(synth_data), "--limit", "6", "--batch-size", "3", "--json"])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["methods"]}
    assert rows["original"]["ratio_total"] == 1.0
    assert rows["original"]["agreement"] == 1.0 and rows["original"]["kl"] == 0.0
    names = " ".join(rows)
    for m in ("FastV", "PyramidDrop", "DART", "SparseVLM", "VScan", "VisionZip", "DivPrune",
              "k-center", "pooling", "random", "ShortV"):
        assert m in names, m
    for name, r in rows.items():
        if name != "original":
            assert 0 < r["ratio_total"] < 1, (name, r["ratio_total"])
            assert r["ratio_llm"] < r["ratio_total"], name  # the tower's cost is in the total
            assert 0 <= r["agreement"] <= 1 and r["kl"] >= 0
            assert r["latency_ms"] > 0
