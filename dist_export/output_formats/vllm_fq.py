"""`--format vllm-fq`: folded fake-quant weights plus `vllm_fq_modelopt_state.pth` (formats.md section 2).

Every rank at plan and execute time; rank 0 at commit (the state file).
"""
from __future__ import annotations

import io
import os

import torch

from ..layout import STATE_FILE_NAME
from ..numerics import fake_quant
from .state import build_vllm_fq_state, cpu_unsupported_reason, state_from_quantizers
from . import OutputFormat, register_output_format



def serving_warnings(items) -> list[str]:
    """One line per distinct reason ModelOpt 0.47's vLLM worker cannot serve these input quantizers on CPU."""
    reasons: dict[str, str] = {}
    for item in items:
        if item.quantized and (reason := cpu_unsupported_reason(item.input)):
            reasons.setdefault(reason, item.module)
    return [f"vllm-fq: serve this export on a GPU: {reason} (e.g. {module}.input_quantizer)"
            for reason, module in reasons.items()]


class VllmFakeQuant(OutputFormat):
    name = "vllm-fq"
    file_names = (STATE_FILE_NAME,)
    carries_kv_cache = True  # in the state file (k_bmm/v_bmm quantizers), no tensors

    def load_hint(self, out_dir: str) -> str:
        return (f"MODELOPT_STATE_PATH={out_dir}/{STATE_FILE_NAME} python vllm_serve_fakequant.py {out_dir} "
                "(ModelOpt's examples/vllm_serve; plain vLLM or transformers load the folded weights without "
                "activation quant)")

    def check_items(self, items, recipe):
        return serving_warnings(items)

    def produce(self, item, w, amax, block_amax, input_amax):
        if not item.quantized:
            return [(item.name, w)]
        return [(item.name, fake_quant(w, item.weight, amax, block_amax))]

    folds_pre_quant_scale = True
    carries_quantizer_state = True

    def fold_pre_quant_scale(self, item, outputs, scale):
        # As ModelOpt's exporter: (x * s) @ fq(W).T == x @ (fq(W) * s[None, :]).T, one rounding to W's dtype.
        (name, y), = outputs
        return [(name, (y * scale.to(y.device).reshape(-1)[None, :]).to(y.dtype))]

    def update_config(self, config, plan, recipe):
        config = dict(config)
        config.pop("quantization_config", None)  # vLLM would try to load real-quant kernels
        return config

    def extra_files(self, plan, recipe, calib):
        buf = io.BytesIO()
        state = (state_from_quantizers(calib) if hasattr(calib, "activations")  # the model's own quantizers
                 else build_vllm_fq_state(plan, recipe, calib))
        torch.save(state, buf)
        return {STATE_FILE_NAME: buf.getvalue()}

    def check_folder(self, out_dir, metas, config, rep):
        """The state file, where there is one, loads with weights_only=True and holds no weight quantizer."""
        path = os.path.join(out_dir, STATE_FILE_NAME)
        if not os.path.isfile(path):
            return
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001
            rep.defect(f"{STATE_FILE_NAME} does not load with weights_only=True: {str(e).splitlines()[0]}")
            return
        for key in ("modelopt_state_dict", "modelopt_version", "modelopt_state_weights"):
            if key not in state:
                rep.defect(f"{STATE_FILE_NAME} lacks {key!r}")
        for name, entry in state.get("modelopt_state_weights", {}).items():
            if "weight_quantizer" in name:
                rep.defect(f"state file holds weight quantizer {name}; its effect must be folded, not restored")
            amax = entry.get("_amax")
            if amax is not None and not torch.isfinite(amax.float()).all():
                rep.defect(f"state file: amax of {name} is not finite")


register_output_format(VllmFakeQuant())
