"""Diff the metrics.json of two runs of scripts/same_numbers.sh: accuracies (unified, M0, every
expert, per domain; every row of a suite) and upload bytes per client must be identical.

    python3 scripts/diff_metrics.py <clone A> <label A> <clone B> <label B>
"""

import json
import sys
from pathlib import Path

SPECS = ["tiny-metamoe", "tiny_text-metamoe", "tiny-fedavg", "tiny-fedavg_moe",
         "tiny-fedalign_moe", "tiny-ddome", "tiny-oneshot_suite", "tiny-unrestricted_moe_scratch",
         "tiny-metamoe_suite", "demo"]


def summary(m: dict) -> dict:
    out = {"accuracy": m["accuracy"]["per_domain"], "upload_bytes": m["upload_bytes"],
           "route_share": m.get("route_share")}
    refs = m.get("references") or {}
    out["zero_shot"] = (refs.get("zero_shot") or {}).get("per_domain")
    out["experts"] = {k: v["per_domain"] for k, v in (refs.get("experts") or {}).items()}
    out["rows"] = {r: {"acc": v["accuracy"]["per_domain"], "bytes": v["upload_bytes"]}
                   for r, v in (m.get("rows") or {}).items()}
    return out


def main(a: str, la: str, b: str, lb: str) -> int:
    same_all = True
    for spec in SPECS:
        pa = Path(a) / "results" / f"cmp-{la}-{spec}" / "metrics.json"
        pb = Path(b) / "results" / f"cmp-{lb}-{spec}" / "metrics.json"
        if not (pa.exists() and pb.exists()):
            print(f"{spec}: missing")
            same_all = False
            continue
        ma, mb = json.loads(pa.read_text()), json.loads(pb.read_text())
        same = json.dumps(summary(ma), sort_keys=True) == json.dumps(summary(mb), sort_keys=True)
        same_all &= same
        print(f"{spec}: {'IDENTICAL' if same else 'DIFFERENT'} average "
              f"{ma['accuracy']['average']:.4f} / {mb['accuracy']['average']:.4f}, "
              f"upload {ma['upload_bytes']} / {mb['upload_bytes']}")
    print("ALL IDENTICAL" if same_all else "SOME DIFFER")
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
