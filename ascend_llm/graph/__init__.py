"""Graph mode: decode-step capture per batch bucket (NPUGraph / CUDAGraph) and torch.compile."""
from ascend_llm.graph.capture import DecodeGraphRunner, GraphAPI, cuda_graph_api, npu_graph_api
from ascend_llm.graph.compile import compile_decode_step

__all__ = ["DecodeGraphRunner", "GraphAPI", "compile_decode_step", "cuda_graph_api", "npu_graph_api"]
