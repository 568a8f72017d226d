"""Adapters as files: the PEFT adapter folder format (folder), saving, loading and merging one, and the
singular values of every update it holds (spectrum). Sits above model/: it builds on the module tree and plan."""
