from fapool.model.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
