"""A training run: the loop (engine) with its checkpoints, stop/pause control, optimizer and schedule, losses,
compiled layers and evaluation, and run folders read back (run_folder)."""
