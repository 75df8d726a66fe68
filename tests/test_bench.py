"""The GPU benchmark scripts still run: their time on a lent GPU is short and a
script that fails there wastes it. CI has no GPU, so bench/gpu.py runs its
--dry-run (tiny models on the CPU) and bench/gpu_profile.py's training-loss
variant is checked on the CPU against the trainer's loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from gpt2.model import GPT2

BENCH = Path(__file__).parents[1] / "bench"


def test_gpu_bench_dry_run_writes_every_section(tmp_path):
    run = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    sections = result["sections"]
    assert set(sections) == {"decode", "train", "trainer", "xl", "trained"}
    for name, section in sections.items():
        assert "error" not in section, (name, section["error"])
    train = sections["train"]
    for name in ("hf_eager", "ours_eager"):
        assert train[name]["tokens_per_s"] > 0, name
        assert train[name]["back_to_back_tokens_per_s"] > 0, name
    trainer = sections["trainer"]  # the loop's own log: one rate per step
    assert len(trainer["per_step"]) == trainer["steps"] == 8
    assert trainer["min_tokens_per_s"] <= trainer["tokens_per_s"] <= trainer["max_tokens_per_s"]
    assert "skipped" in train["ours_compiled"] and "skipped" in train["ours_compiled_tuned"]
    # in fp32 the static decode step must give the cached path's greedy tokens
    same = sections["decode"]["fp32_greedy_identity"]["ours_static_eager"]
    assert same["identical"], same
    for batch in (1, 4):  # the dry run's batches
        res = sections["decode"][f"batch_{batch}"]
        bound = res["bound"]
        assert bound["weights_bytes"] > 0 and bound["tokens_per_s"] > 0
        share = res["ours_static_eager"]["share_of_bound"]
        assert share == res["ours_static_eager"]["tokens_per_s"] / bound["tokens_per_s"]
        assert "share_of_bound" not in res["hf_generate_fp32"]  # fp32 weights: not our bound
        for name, same in res["greedy_identical"].items():
            assert same["identical"] or same["logit_gap"] >= 0, (name, same)
    # on trained weights the static step gives the cached path's bf16 greedy tokens
    trained = sections["trained"]
    for label, rows in (("batch_1", 1), ("batch_4", 4)):
        same = trained[label]["ours_static_eager"]
        assert trained[label]["rows"] == rows and same["rows_identical"] == rows, same
        assert same["identical"], same


def test_clip_ab_dry_run_runs_each_variant(tmp_path):
    """bench/clip_ab.py on the CPU: five runs of the loop, each logging every step."""
    run = subprocess.run(
        [sys.executable, str(BENCH / "clip_ab.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    runs = json.loads((tmp_path / "clip_ab.json").read_text())
    assert [r["variant"] for r in runs] == ["clip_grad_norm", "clip_in_adamw",
                                             "clip_grad_norm", "clip_in_adamw", "no_clip"]
    for r in runs:
        assert len(r["per_step"]) == r["steps"] == 8 and r["tokens_per_s"] > 0


def test_gpu_bench_says_how_close_a_call_a_greedy_divergence_was(hf_checkpoint, monkeypatch):
    """gpu.py's `divergence`: where two greedy runs part, and the gap between the two
    tokens' logits there (oracle: transformers' logits on the same weights)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu

    ckpt = hf_checkpoint()
    model = GPT2.from_pretrained(ckpt.folder).eval()
    idx = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    ref = model.generate(idx, max_new_tokens=6, temperature=0.0)  # (2, 10)
    assert gpu.divergence(model, ref, ref.clone(), 4) == {"identical": True}
    with torch.no_grad():
        logits = ckpt.model(ref[1:, :7]).logits[0, -1]  # (V,): what new token 3 was chosen from
    top2 = logits.topk(2)
    assert int(top2.indices[0]) == int(ref[1, 7])
    got = ref.clone()
    got[1, 7] = top2.indices[1]  # row 1 takes the runner-up at new token 3
    result = gpu.divergence(model, ref, got, 4)
    assert result["first_mismatch_at_new_token"] == 3 and result["row"] == 1
    gap = float(top2.values[0] - top2.values[1])
    assert abs(result["logit_gap"] - gap) <= 1e-4
    size = float(top2.values[0].abs().max(top2.values[1].abs()))
    assert size / 256 < result["bf16_spacing_there"] <= size / 128  # 8 significant bits


