"""ModelOpt's vLLM fake-quant worker on vLLM's CPU worker (consumer tests only; never imported by dist_export).

ModelOpt's `FakeQuantWorker` (examples/vllm_serve/fakequant_worker.py of NVIDIA/Model-Optimizer, not shipped in
the wheel) subclasses vLLM's GPU worker; deriving from vLLM's CPU worker too is all it needs on CPU. The folder
holding that example is named by DIST_EXPORT_MODELOPT_VLLM_SERVE.
"""
import os
import sys

sys.path.insert(0, os.environ["DIST_EXPORT_MODELOPT_VLLM_SERVE"])

from fakequant_worker import FakeQuantWorker  # noqa: E402
from vllm.v1.worker.cpu_worker import CPUWorker  # noqa: E402


class CPUFakeQuantWorker(FakeQuantWorker, CPUWorker):
    pass
