"""The model side: open a model from any source (loading), its module tree (inventory), the LoRA plan with
its exact counts and the one LoraConfig builder (plan), and the GPU memory estimate (memory)."""
