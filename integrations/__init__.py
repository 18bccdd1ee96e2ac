"""Thin adapters from mp_plugin's core to other frameworks.

Installed as ``mp_plugin.integrations``; each submodule imports its framework
(torchao, ModelOpt, onnx/onnxruntime, TensorRT) only when it is itself imported.
"""
