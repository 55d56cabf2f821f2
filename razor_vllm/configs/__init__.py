"""Head masks shipped with razor-vllm, produced by `razor-vllm profile`."""
