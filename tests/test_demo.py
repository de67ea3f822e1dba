"""./demo.sh, the README's first command, runs the whole workflow and the loss falls."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_the_whole_workflow():
    out = subprocess.run(["bash", "demo.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "Traceback" not in text
    base, tuned = map(float, re.search(r"base ([\d.]+) -> with the adapter ([\d.]+)", text).groups())
    assert base > 10 and tuned < base - 3, text[-2000:]
    assert (ROOT / "merge" / "demo" / "demo-lora-2.pth").is_file()
    assert "Loading merge/demo/demo-lora-2" in text          # the official rwkv package loaded it
    assert "'User: What is RWKV?\\n\\nAssistant:" in text
