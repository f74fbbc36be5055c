"""llama-cpp-python's OpenAI-compatible server, `python -m playground.llamacpp_server` with the
options of `python -m llama_cpp.server`, without llama.cpp's repacked CPU weights where the CPU
has AMX: prompts crashed that server there as they crashed the app's workers
(playground.gguf_types.cpu_repack_wanted). The tests and benchmarks serve GGUFs with it."""

from __future__ import annotations

import runpy
import sys

from playground.backends.llamacpp_backend import cpu_repack_allowed, extra_buffer_types

if __name__ == "__main__":
    with extra_buffer_types(cpu_repack_allowed()):  # the server makes its model inside
        sys.argv[0] = "llama_cpp.server"
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
