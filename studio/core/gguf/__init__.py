"""One GGUF file from base + adapter for llama.cpp and Ollama: the export, the tensor layout and hyperparameters,
the vocabulary, and the Ollama Modelfile."""
