"""Is ONNX Runtime faster than eager torch for the sampler's network on this CPU?

Run: .venv/bin/pip install onnxruntime onnx && .venv/bin/python benchmarks/onnxruntime_check.py
  -> benchmarks/results/onnxruntime_check.json

Exports the `reduced` U-Net (untrained; speed does not depend on the weights) to ONNX and times
forward passes at batch 256, t = 500: ONNX Runtime's CPU provider on the fp32 export (no bf16
variant tried) against torch eager in fp32 and in bf16 autocast, in the same process, median of 10.
"""

import json
from pathlib import Path

import common  # noqa: F401  (the checkout's src on sys.path; freed memory kept)
import torch

from minidiff.runtime import environment, timed  # noqa: E402
from minidiff.unet import PRESETS, UNet  # noqa: E402


def rate(fn, batch):
    return round(batch / timed(fn, 10, warmup=fn).seconds, 1)


import onnxruntime as ort  # noqa: E402

torch.manual_seed(0)
model = UNet(PRESETS["reduced"]).eval()
x, t = torch.randn(256, 1, 28, 28), torch.full((256,), 500)
path = Path("/tmp/minidiff-reduced.onnx")
torch.onnx.export(model, (x, t), str(path), input_names=["x", "t"], output_names=["eps"],
                  dynamo=False, opset_version=17)
opts = ort.SessionOptions()
opts.intra_op_num_threads = torch.get_num_threads()
sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
feed = {"x": x.numpy(), "t": t.numpy()}
res = {**environment(), "onnxruntime": ort.__version__, "batch": 256, "img_per_s": {}}
res["img_per_s"]["onnxruntime fp32"] = rate(lambda: sess.run(None, feed), 256)
with torch.inference_mode():
    res["img_per_s"]["torch eager fp32"] = rate(lambda: model(x, t), 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res["img_per_s"]["torch eager bf16"] = rate(lambda: model(x, t), 256)
out = Path(__file__).resolve().parent / "results" / "onnxruntime_check.json"
out.write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res, indent=2))
