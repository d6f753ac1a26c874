"""benchmarks/scorer_choice.py: its --quick run, and the calibration it makes the residual thresholds with."""

import json

import torch

from aptvit.core.scoring import SCORERS
from benchmarks import scorer_choice as sc


def test_quick_run_writes_every_output(tmp_path):
    out = tmp_path / "res"
    argv = ["--quick", "--budgets", "0.5", "--work", str(tmp_path / "w"), "--results", str(out)]
    assert sc.main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    table = (tmp_path / "res_table.md").read_text()
    assert (tmp_path / "res_layouts.png").stat().st_size > 0
    for scorer in sc.COMPARED:
        fid = rows[f"fidelity|56|val|2|0.5|{scorer}"]
        assert 0 < fid["tokens_kept"] <= 0.5 and -1 <= fid["dense_cos"] <= 1 + 1e-6
        assert any(k.startswith("top1|") and k.endswith(f"|{scorer}|default|None") for k in rows)
    assert "residual threshold" in table and "paired diff to entropy" in table


def test_calibrated_thresholds_pass_as_many_patches_as_entropy():
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(6, 128, 128, generator=g) * 255
    gray[:3] = torch.linspace(0, 255, 128).expand(3, 128, 128)  # some plain, some busy patches
    gray[:, :64, :64] = gray[:, :64, :64] * 0.1 + 100
    cal = sc.calibrate([gray], base=16, factors=(2, 4))
    for k, row in cal.items():
        ent = SCORERS["entropy"].fn(gray, [16 * k], 16)[16 * k]
        res = SCORERS["residual"].fn(gray, [16 * k], 16)[16 * k]
        assert row["entropy_pass"] == float((ent < SCORERS["entropy"].thresholds[k]).double().mean())
        # the quantile: at most that share of residual scores lie strictly below it, at least that share at or below
        assert float((res < row["residual"] - 0.01).double().mean()) <= row["entropy_pass"] + 1e-9
        assert float((res <= row["residual"] + 0.01).double().mean()) >= row["entropy_pass"] - 1e-9
