"""python -m latentfast.diagnose: runs on the embedded pair; advice follows seed note 004."""
from latentfast import diagnose


def _args(**kw):
    return diagnose._parser().parse_args([f"--{k}={v}" for k, v in kw.items()])


def test_report_thresholds():
    vals = {"ce": [2.0, 2.2], "kv": [0.1, 0.12], "kv_weighted": [0.105, 0.125], "codi": [0.08, 0.09], "cka": [0.7, 0.75]}
    text = diagnose.report(vals, _args())
    assert "KV Loss:" in text and "CKA contribution" in text
    assert "✅ CKA weight is reasonable" in text  # 0.036 / 2.28 ~ 1.6%
    assert "Reasonable change" in text
    loud = diagnose.report(vals, _args(cka_weight=1.0))
    assert "lower --cka_weight" in loud
    quiet = diagnose.report(vals, _args(cka_weight=0.001))
    assert "raise --cka_weight" in quiet
    flat = dict(vals, kv_weighted=vals["kv"])
    assert "Almost no change" in diagnose.report(flat, _args())


def test_runs_on_embedded_pair(capsys):
    assert diagnose.main(["--num_samples", "2", "--use_teacher_attention", "--cka_layers", "all"]) == 0
    out = capsys.readouterr().out
    for section in ("Loss Scales", "Weighted Contributions", "Recommendations", "Attention weighting effect",
                    "teacher attention"):
        assert section in out
