"""Does IQ4_XS (4.25 bits per weight, between Q3_K and Q4_K) help the exact allocation? MILP with and
without it among the candidates, at llama.cpp's Q3_K_M and Q4_K_M tensor bytes, on ref-llama-a
(kl_calibrated sensitivity, RTN quantizer; llama.cpp perplexity, first 100 WikiText-2 test chunks).
Reuses kquant_presets.py's calibration and preset files (run that first).

    python bench/iq4_candidate.py
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from haloquant.artifacts import read_json
from haloquant.presets import tensor_data_bytes
from haloquant.schemas.params import AllocationSpec, QuantizeSpec, SensitivitySpec
from haloquant.tasks.allocate import allocate
from haloquant.tasks.sensitivity import score_sensitivity

from common import REPO, build_and_score, setup  # noqa: E402  (bench/ is on sys.path when run as a script)

R = Path("/tmp/haloquant-kquants")
O = Path("/tmp/haloquant-iq4-candidate")
spec, calib, text = setup(REPO.parent / "shared/models/ref-llama-a", R)
BASE = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
for label, fmts in [("base", BASE), ("iq4xs", BASE + ["IQ4_XS"])]:
    sens = O / label / "sensitivity"
    t0 = time.perf_counter()
    if not (sens / "sensitivity.json").is_file():
        score_sensitivity(spec, SensitivitySpec(formats=fmts), QuantizeSpec(), calib, sens)
    print(label, "sensitivity", round(time.perf_counter() - t0), "s", flush=True)
    for preset in ["Q3_K_M", "Q4_K_M"]:
        b = tensor_data_bytes(R / preset / "llama.cpp.gguf")
        d = O / label / preset
        allocate(AllocationSpec(budget={"total_bytes": b}), sens, d / "allocate")
        a = read_json(d / "allocate/allocation.json")
        used = Counter(t["format"] for t in a["tensors"])
        _, p = build_and_score(spec, calib, d / "allocate", d, text, 100)
        print(json.dumps({"formats": label, "at_bytes_of": preset, "budget": b, "used": a["used_bytes"], "ppl": p,
                          "proxy_objective": a["objective"], "types": used}), flush=True)
