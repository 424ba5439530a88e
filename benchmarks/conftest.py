import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import _common  # noqa: E402,F401  (sets TRITON_INTERPRET before triton is imported)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["pyratok_machine"] = _common.machine()
