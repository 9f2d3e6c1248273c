"""Triton python-backend model ``strings``: UPPER = TEXT.upper(), LENGTH = len(TEXT) in bytes.

Runs only inside Triton (``triton_python_backend_utils`` is provided by the python backend).
"""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            flat = [bytes(v) for v in text.reshape(-1)]
            upper = np.array([v.upper() for v in flat], dtype=np.object_).reshape(text.shape)
            length = np.array([len(v) for v in flat], dtype=np.int64).reshape(text.shape)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("UPPER", upper),
                pb_utils.Tensor("LENGTH", length),
            ]))
        return responses
